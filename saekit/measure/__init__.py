"""What pursue and eval share to measure encodings, and the held-out rule every stage keeps.

    downstream.py  CE / KL: splicing reconstructions into the model
    gap.py         the gap decomposition (encoder -> refit -> gp)
    heldout.py     the held-out rows (the last rows of a store, never trained on)
    recovery.py    ground-truth recovery on synthetic activations (MCC, support F1, shrinkage)
    noise.py       a figure over seeds: mean ± 95% CI, and "within noise"

Nothing is imported here: a stage imports the part it needs.
"""

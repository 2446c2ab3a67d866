"""`saekit harvest`: run a model over texts once and fill an activation store."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def harvest(
    model: Annotated[Optional[str], typer.Option(help="transformer-lens name (gpt2-small), a local HF checkpoint folder, or 'embedded' (default).")] = None,
    hook: Annotated[Optional[list[str]], typer.Option("--hook", help="Hook to cache; repeat for several (one forward pass). Default: blocks.{n_layers//2}.hook_resid_pre.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="HF hub dataset (streamed), a .txt/.jsonl/.parquet file, a save_to_disk folder, or 'embedded' (default).")] = None,
    dataset_config: Annotated[Optional[str], typer.Option(help="HF dataset configuration name.")] = None,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    out: Annotated[Optional[str], typer.Option(help="Store directory. Default: cache/<model>__<hook>__<dataset>.")] = None,
    tokens: Annotated[int, typer.Option(help="Rows (token positions) to cache.")] = 1_000_000,
    ctx_len: Annotated[int, typer.Option(help="Tokens per sequence, BOS included; 0 = min(128, n_ctx).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass; 0 = auto.")] = 0,
    skip_first_n_tokens: Annotated[int, typer.Option(help="Positions left out at the start of each sequence (1 = BOS).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32, fp16.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted harvest in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store in --out.")] = False,
    shard_rows: Annotated[int, typer.Option(help="Rows per shard file (unit of writing, resuming, splitting across ranks).")] = 65536,
    chunk_rows: Annotated[int, typer.Option(help="Rows per inner chunk.")] = 4096,
) -> None:
    """Harvest activations into a store. Under `torchrun --nproc_per_node N` the ranks split the work."""
    from saekit.harvest import HarvestConfig, run

    cfg = HarvestConfig(
        model=model, hooks=list(hook or []), dataset=dataset, dataset_config=dataset_config, split=split,
        text_column=text_column, out=out, tokens=tokens, ctx_len=ctx_len, batch_size=batch_size,
        skip_first_n_tokens=skip_first_n_tokens, device=device, dtype=dtype, resume=resume, overwrite=overwrite,
        shard_rows=shard_rows, chunk_rows=chunk_rows,
    )
    res = run(cfg)
    if res.content_hash:  # rank 0
        typer.echo(f"{res.path}  {res.n_rows:,} rows  {res.content_hash}")


def register(app: typer.Typer) -> None:
    app.command("harvest")(harvest)

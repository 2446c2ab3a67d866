"""Every swap into place survives a kill between any two of its filesystem changes, including a
kill while it cleans up and a second kill in the next attempt: the checkpoint (and so `train
--resume`), an SAE directory saved over another, and a store replaced with --overwrite. The kill
points are reached deterministically (`crash_points`), on a file system that can exchange two
directories atomically and on one that cannot."""

import shutil

import pytest
import torch
from crash_points import kill_points, run_until_killed

from saekit.metrics import FiringTracker
from saekit.sae import SparseAutoencoder
from saekit.train.checkpoint import Position, checkpoint_dir, load_checkpoint, save_checkpoint

EXCHANGE = pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])


def _state(step: int):
    """An SAE, its optimizer and firing tracker whose weights say which step they are."""
    sae = SparseAutoencoder(d_in=4, n_features=8, k=2)
    with torch.no_grad():
        sae.encoder.W_enc.fill_(float(step))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    return sae, opt, FiringTracker(8, window=100)


def _save(out, step: int) -> None:
    sae, opt, firing = _state(step)
    save_checkpoint(out, sae, opt, firing, Position(step, 0, step))


def _resumed_step(out) -> int:
    """What `train --resume` restores: the step of the checkpoint it finds, checked against its weights."""
    ckpt = checkpoint_dir(out)
    assert ckpt is not None, sorted(p.name for p in out.iterdir())
    sae, opt, firing = _state(0)
    pos = load_checkpoint(ckpt, sae, opt, firing)
    assert torch.equal(sae.encoder.W_enc, torch.full_like(sae.encoder.W_enc, float(pos.step)))
    return pos.step


@EXCHANGE
@pytest.mark.slow
def test_a_kill_anywhere_in_a_checkpoint_swap_resumes(tmp_path, exchange):
    template = tmp_path / "template"
    template.mkdir()
    _save(template, 1)
    count = shutil.copytree(template, tmp_path / "count")
    points = kill_points(lambda: _save(count, 2), exchange)
    assert len(points) > 5
    for n in points:
        for m in [None, *points]:  # then, resumed, killed again at any point of the next checkpoint
            out = shutil.copytree(template, tmp_path / f"run-{n}-{m}")
            assert run_until_killed(lambda out=out: _save(out, 2), n, exchange)
            assert _resumed_step(out) in (1, 2)
            if m is not None and run_until_killed(lambda out=out: _save(out, 3), m, exchange):
                assert _resumed_step(out) in (1, 2, 3)
            _save(out, 4)  # a later checkpoint always lands, and is the one resumed
            assert _resumed_step(out) == 4
            shutil.rmtree(out)


@EXCHANGE
def test_a_kill_anywhere_while_an_sae_is_saved_over_another_keeps_one_of_them(tmp_path, exchange):
    """`sae.save(path, overwrite=True)` (how a run publishes sae/): path holds the old SAE or the
    new one at every kill point, and the next save leaves nothing else beside it."""

    def sae(value: float) -> SparseAutoencoder:
        s = SparseAutoencoder(d_in=4, n_features=8, k=2)
        with torch.no_grad():
            s.encoder.W_enc.fill_(value)
        return s

    def value(path) -> float:
        return float(SparseAutoencoder.load(path).encoder.W_enc[0, 0])

    sae(1.0).save(tmp_path / "count" / "sae")
    points = kill_points(lambda: sae(2.0).save(tmp_path / "count" / "sae", overwrite=True), exchange)
    for n in points:
        root = tmp_path / f"run-{n}"
        sae(1.0).save(root / "sae")
        assert run_until_killed(lambda root=root: sae(2.0).save(root / "sae", overwrite=True), n, exchange)
        if (root / "sae").exists():
            assert value(root / "sae") in (1.0, 2.0)
        else:  # two renames, killed between them: the old SAE waits aside, whole
            assert not exchange and value(root / "sae.old") == 1.0
        sae(3.0).save(root / "sae", overwrite=True)
        assert value(root / "sae") == 3.0 and sorted(p.name for p in root.iterdir()) == ["sae"]


@pytest.mark.slow
def test_a_kill_anywhere_in_harvest_overwrite_leaves_a_store_that_overwrite_replaces(tmp_path):
    """`create_store(overwrite=True)` (harvest --overwrite) removes the old store and creates the
    new one; killed at any point, the old store is whole or recognisably on its way out, and
    --overwrite again replaces it (never "not a saekit store; refusing to delete it")."""
    from saekit.store import create_store, open_store

    def store(path, value: float, overwrite: bool = False) -> None:
        w = create_store(
            path, {"h": 4}, n_rows=64, meta={"v": value}, shard_rows=32, chunk_rows=16, overwrite=overwrite
        )
        w.append({"h": torch.full((64, 4), value)}, torch.arange(64), torch.arange(64))
        w.finalize()

    store(tmp_path / "count", 1.0)
    points = kill_points(lambda: store(tmp_path / "count", 2.0, overwrite=True))
    for n in points:
        root = tmp_path / f"store-{n}"
        store(root, 1.0)
        assert run_until_killed(lambda root=root: store(root, 2.0, overwrite=True), n)
        store(root, 3.0, overwrite=True)
        st = open_store(root)
        assert st.meta == {"v": 3.0} and st.verify() == [] and float(st.rows("h", 0, 64)[0, 0]) == 3.0


def test_a_file_written_atomically_is_the_old_one_or_the_new_one_never_half(tmp_path):
    """Reports, records, zarr.json, plots and downloads all go through `atomic.writing`: a write
    that fails midway keeps the old file whole and leaves no temporary file behind."""
    from saekit.atomic import write_atomic, writing

    report = tmp_path / "report.md"
    write_atomic(report, "old report\n")
    with pytest.raises(OSError, match="disk full"):
        with writing(report) as tmp:
            tmp.write_text("half of the new rep")
            raise OSError(28, "disk full")
    assert report.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    write_atomic(report, b"new report\n")
    assert report.read_bytes() == b"new report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]

"""The bad-input table: `saekit` run on 157 bad inputs across every command (issue 9, item 12; eval: issue 11).

Each row must
  (a) exit non-zero,
  (b) print exactly one `error:` line, last on stderr, and no traceback,
  (c) change nothing already written: every file under the inputs it names (the shared store,
      run dir, SAE dirs, checkpoint, demo) and under the row's own directory (its damaged copies,
      an --out that existed) hashes the same afterwards, and no new file or directory appears
      there. Only a command that stops partway (a full disk, a damaged shard that training or
      pursuit reaches) may leave its partial output at a new --out, which --resume continues.

The inputs are real: a store harvested from the embedded model, a run dir from `saekit train`, a
saekit SAE dir, a sae-lens dir written by sae-lens's own save_model, a tiny HF checkpoint and a
finished tiny demo; each row damages a copy (rows reading object storage upload it to a bucket of
conftest's local S3 server). Rows run in-process through saekit.cli.main:main (a subprocess costs
seconds of imports), except those that need a real non-root user (setpriv).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from cli_checks import NO_DAC, in_process, one_error, saekit

HOOK = "blocks.2.hook_resid_pre"  # the embedded model's default hook (d_model 128)
SHARD = f"acts/{HOOK}/c/1/0"  # the second of the store's four shard files
NOISE = random.Random(0).randbytes(8192)


class Inputs(NamedTuple):
    """What was already written, shared by every row (rows damage copies, never these)."""

    store: Path  # a complete store harvested from the embedded model: 2048 rows of HOOK, 4 shards
    run: Path  # a finished `saekit train` run on it (64 latents, k 4) with a checkpoint
    sae: Path  # run/sae: a saekit SAE directory
    lens: Path  # a sae-lens TopK SAE (d_in 128, 64 latents) saved by sae-lens's save_model
    ckpt: Path  # a tiny GPT-2 HF checkpoint (safetensors weights)
    demo: Path  # a finished tiny `saekit demo` directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    import sae_lens
    import torch
    from test_sources import make_tiny_gpt2

    from saekit.demo import DemoConfig
    from saekit.demo import run as demo
    from saekit.harvest import HarvestConfig
    from saekit.harvest import run as harvest
    from saekit.train import TrainConfig
    from saekit.train import run as train

    root = tmp_path_factory.mktemp("bad-input")
    store = harvest(
        HarvestConfig(
            out=str(root / "store"), tokens=2048, shard_rows=512, chunk_rows=128, device="cpu", progress=False
        )
    ).path
    run = train(
        TrainConfig(
            store=str(store),
            out=str(root / "run"),
            n_features=64,
            k=4,
            batch_size=64,
            tokens=256,
            eval_rows=256,
            checkpoint_every=2,
            device="cpu",
            progress=False,
        )
    ).out
    torch.manual_seed(0)
    lens = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=128, d_sae=64, k=4))
    with torch.no_grad():
        lens.W_dec /= lens.W_dec.norm(dim=1, keepdim=True)  # unit rows, as sae-lens trains them
    lens.save_model(root / "lens")
    ckpt = make_tiny_gpt2(root / "tiny-gpt2")
    demo_out = demo(DemoConfig(out=str(root / "demo"), tokens=2048, steps=2, rows=200, progress=False)).store.parent
    return Inputs(Path(store), run, run / "sae", root / "lens", Path(ckpt), demo_out)


class Env(NamedTuple):
    """What a row's `make` gets."""

    inputs: Inputs
    tmp: Path  # the row's own directory (hashed before and after)
    tmpfs: Callable  # the conftest fixture: tmpfs(size, ro=False) -> a mounted directory
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest  # for conftest's s3_server, started only by the rows that need it

    @property
    def store(self) -> Path:
        return self.inputs.store

    @property
    def sae(self) -> Path:
        return self.inputs.sae


class Row(NamedTuple):
    make: Callable[[Env], list]
    """Builds the row's bad input under env.tmp; returns the arguments after `saekit`."""
    says: str
    """A fragment of the one `error:` line."""
    needs: str = ""
    """'tmpfs' (mounts one: root), 'setpriv' (runs as a user without root's file-permission override) or
    's3' (a local S3 server: the conftest fixture)."""
    partial: bool = False
    """The command stops partway (a full disk; a damaged shard that training, pursuit or copy reaches):
    its new --out (copy: DST) may keep the partial output, which --resume (copy: a rerun) continues."""


# --- commands, with every size small ------------------------------------------------------


def harvest(out, *more) -> list:
    return ["harvest", "--tokens", 256, "--device", "cpu", "--out", out, *more]


def train(store, out, *more) -> list:
    return [
        "train",
        "--store",
        store,
        "--out",
        out,
        "--n-features",
        64,
        "--k",
        4,
        "--batch-size",
        64,
        "--tokens",
        128,
        "--eval-rows",
        256,
        "--device",
        "cpu",
        "--no-progress",
        *more,
    ]


def pursue(store, sae, out, *more) -> list:
    return [
        "pursue",
        "--store",
        store,
        "--sae",
        sae,
        "--k",
        2,
        "--method",
        "gp",
        "--device",
        "cpu",
        "--out",
        out,
        *more,
    ]


def evaluate(store, sae, out, *more) -> list:
    return ["eval", "--store", store, "--sae", sae, "--device", "cpu", "--no-progress", "--out", out, *more]


def dashboard(store, sae, out, *more) -> list:
    return ["dashboard", "--store", store, "--sae", sae, "--device", "cpu", "--no-progress", "--out", out, *more]


def demo(out, *more) -> list:
    return ["demo", "--tokens", 2048, "--steps", 2, "--rows", 200, "--device", "cpu", "--out", out, *more]


# --- bad things to point them at ------------------------------------------------------------


def copy(env: Env, src: Path, name: str | None = None) -> Path:
    return Path(shutil.copytree(src, env.tmp / (name or src.name)))


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def damaged_codes(env: Env) -> Path:
    """A finished `saekit pursue` output whose codes.zarr/zarr.json is cut short."""
    out = env.tmp / "codes"
    code, _, err = in_process(env.capsys, env.monkeypatch, *pursue(env.store, env.sae, out))
    assert code == 0, err
    truncate(out / "codes.zarr" / "zarr.json")
    return out


def noise(env: Env, name: str) -> Path:
    return write(env.tmp / name, NOISE)


def a_file(env: Env) -> Path:
    return write(env.tmp / "notes.txt", "a file the user keeps")


def read_only(env: Env) -> Path:
    return env.tmpfs(1 << 20, ro=True) / "out"


def locked(env: Env) -> Path:
    (env.tmp / "locked").mkdir(mode=0o555)
    return env.tmp / "locked" / "out"


def url_out(env: Env, url: str) -> str:
    """An --out that is a URL saekit cannot write to. Run from the row's own directory, so a URL
    taken for a local path (a folder named `s3:`) is a new directory there, and the row fails."""
    env.monkeypatch.chdir(env.tmp)
    return url


def too_long(env: Env) -> Path:
    return env.tmp / ("x" * 300) / "out"


def full_disk(env: Env, size: int) -> Path:
    return env.tmpfs(size) / "out"


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def flip(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def damaged_store(env: Env, how: str) -> Path:
    """A copy of the store with one kind of damage."""
    s = copy(env, env.inputs.store)
    attrs = lambda change: edit_json(s / "zarr.json", lambda doc: change(doc["attributes"]))
    if how == "missing shard":
        (s / SHARD).unlink()
    elif how == "flipped byte":
        flip(s / SHARD)
    elif how == "zarr.json cut short":
        truncate(s / "zarr.json")
    elif how == "n_rows 'lots'":
        attrs(lambda a: a.update(n_rows="lots"))
    elif how == "hook ../../x":
        attrs(lambda a: a.update(hooks={"../../x": 128}))
    elif how == "meta.ctx_len edited":
        attrs(lambda a: a["meta"].update(ctx_len=99))
    elif how == "mean_sq_norm x1000":
        attrs(lambda a: a["stats"][HOOK].update(mean_sq_norm=a["stats"][HOOK]["mean_sq_norm"] * 1000))
    else:
        raise AssertionError(how)
    return s


def incomplete_store(env: Env) -> Path:
    """A store whose writer never finished (no finalize)."""
    from test_cli_store import make_store

    return make_store(env.tmp / "half", finalize=False)


def bucket(env: Env) -> str:
    """A new, empty bucket on the local S3 server: 's3://<name>'."""
    import s3fs

    env.request.getfixturevalue("s3_server")
    name = "bad-input-" + hashlib.sha256(str(env.tmp).encode()).hexdigest()[:16]
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def in_bucket(env: Env, store: Path | None = None) -> str:
    """The store (or a damaged copy) uploaded to a new bucket, file by file."""
    from saekit.store.remote import Remote

    store = store or env.store
    url = f"{bucket(env)}/store"
    for p in sorted(store.rglob("*")):
        if p.is_file():
            Remote(url).put_file(p, p.relative_to(store).as_posix())
    return url


def damaged_run(env: Env, file: str) -> Path:
    run = copy(env, env.inputs.run)
    truncate(run / file, keep=20)
    return run


def resume(run: Path) -> list:
    return ["train", "--out", run, "--resume", "--no-progress"]


def noisy_metrics(env: Env) -> Path:
    run = copy(env, env.inputs.run)
    write(run / "metrics.jsonl", NOISE)  # newlines among the bytes: not just a torn last line
    return run


def toml(env: Env, line: str) -> Path:
    return write(env.tmp / "train.toml", f'store = "{env.inputs.store}"\nout = "{env.tmp / "run"}"\n{line}\n')


def wide_sae(env: Env) -> Path:
    """A saekit SAE of the wrong width for the store (d_in 32, the store's d_model is 128)."""
    from saekit.sae import SparseAutoencoder

    SparseAutoencoder(d_in=32, n_features=64, k=4).save(env.tmp / "wide")
    return env.tmp / "wide"


def sae_without_weights(env: Env) -> Path:
    sae = copy(env, env.inputs.sae)
    (sae / "sae.safetensors").unlink()
    return sae


def sae_cut_short(env: Env) -> Path:
    sae = copy(env, env.inputs.sae)
    truncate(sae / "sae.safetensors", keep=100)
    return sae


def sae_config_not_json(env: Env) -> Path:
    sae = copy(env, env.inputs.sae)
    write(sae / "config.json", b"\x89PNG\x00{")
    return sae


def lens_d_in_mismatch(env: Env) -> Path:
    lens = copy(env, env.inputs.lens)
    edit_json(lens / "cfg.json", lambda c: c.update(d_in=16))
    return lens


def pickled_checkpoint(env: Env) -> Path:
    """The checkpoint with its weights as a pickled pytorch_model.bin only (what older
    save_pretrained wrote); saekit must refuse it, never unpickle it."""
    import torch
    from safetensors.torch import load_file

    ckpt = copy(env, env.inputs.ckpt)
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    return ckpt


def checkpoint_cut_short(env: Env) -> Path:
    ckpt = copy(env, env.inputs.ckpt)
    truncate(ckpt / "model.safetensors", keep=5000)
    return ckpt


def checkpoint_config_not_json(env: Env) -> Path:
    ckpt = copy(env, env.inputs.ckpt)
    write(ckpt / "config.json", "{'n_layer': 2,")
    return ckpt


def fifo(env: Env) -> Path:
    os.mkfifo(env.tmp / "pipe.jsonl")  # opening it would wait for a writer forever
    return env.tmp / "pipe.jsonl"


def latin1(env: Env) -> Path:
    words = "plain ascii words " * 300
    return write(env.tmp / "latin1.txt", (words + "café" + words).encode("latin-1"))


def not_a_demo(env: Env) -> Path:
    (env.tmp / "mine").mkdir()
    write(env.tmp / "mine" / "notes.txt", "keep")
    return env.tmp / "mine"


def demo_json_damaged(env: Env) -> Path:
    (env.tmp / "d").mkdir()
    write(env.tmp / "d" / "demo.json", '{"tokens": 20')
    return env.tmp / "d"


def store_without_sequences(env: Env) -> Path:
    """A store written through the writer API, as a custom pipeline would: rows and token ids, but no
    harvest metadata saying how the rows form sequences (the ids cannot be rerun)."""
    import torch

    from saekit.store import create_store

    w = create_store(
        env.tmp / "custom", {HOOK: 128}, n_rows=512, meta={"model": "embedded"}, shard_rows=256, chunk_rows=128
    )
    w.append({HOOK: torch.randn(512, 128)}, torch.zeros(512), torch.arange(512) % 128)
    w.finalize()
    return env.tmp / "custom"


def store_without_tokens(env: Env) -> Path:
    s = copy(env, env.inputs.store)
    shutil.rmtree(s / "tokens")
    return s


def store_skipping_two(env: Env) -> Path:
    """A store harvested with --skip-first-n-tokens 2: the first two ids of each sequence are gone."""
    from saekit.harvest import HarvestConfig
    from saekit.harvest import run as harvest_run

    return harvest_run(
        HarvestConfig(out=str(env.tmp / "skip2"), tokens=512, skip_first_n_tokens=2, device="cpu", progress=False)
    ).path


def pursued(env: Env, sae: Path, *more) -> Path:
    """A finished `saekit pursue` output (gp, k 2) of `sae` on the store."""
    out = env.tmp / "codes"
    code, _, err = in_process(env.capsys, env.monkeypatch, *pursue(env.store, sae, out, *more))
    assert code == 0, err
    return out


def distill(env: Env, codes: Path) -> list:
    """`saekit train` of a new encoder over the run's dictionary, distilled from `codes`."""
    return train(
        env.store, env.tmp / "run", "--from-pretrained", env.inputs.run, "--distill", 1, "--distill-codes", codes
    )


def same_shape_model(env: Env) -> Path:
    """A GPT-2 checkpoint of the embedded model's shape (4 layers, d_model 128) with other weights."""
    from test_sources import make_tiny_gpt2

    return make_tiny_gpt2(env.tmp / "other-model", n_ctx=256, n_embd=128, n_layer=4)


# --- the table ------------------------------------------------------------------------------

STORE_DAMAGE = {
    "missing shard": f"{SHARD}",
    "flipped byte": f"{SHARD}",
    "zarr.json cut short": "zarr.json is damaged (not valid JSON)",
    "n_rows 'lots'": "damaged attributes: n_rows",
    "hook ../../x": "damaged attributes: hook name '../../x'",
    "meta.ctx_len edited": "content hash",
    "mean_sq_norm x1000": "content hash",
}


def store_rows(command: str, damages: list[str]) -> dict[str, Row]:
    """`command` on copies of the store with each of `damages`."""

    def args(how: str) -> Callable[[Env], list]:
        def make(env: Env) -> list:
            s = damaged_store(env, how)
            return {
                "info": lambda: ["info", s],
                "verify": lambda: ["verify", s],
                "train": lambda: train(s, env.tmp / "run"),
                # from row 0: the damaged shard is the second, before the held-out rows
                "pursue": lambda: pursue(s, env.sae, env.tmp / "codes", "--start-row", 0),
                # the fixture's own arguments, so only the damage differs
                "harvest --resume": lambda: [
                    "harvest",
                    "--tokens",
                    2048,
                    "--shard-rows",
                    512,
                    "--chunk-rows",
                    128,
                    "--device",
                    "cpu",
                    "--out",
                    s,
                    "--resume",
                ],
                "harvest --overwrite": lambda: harvest(s, "--overwrite"),
                "copy": lambda: ["copy", s, env.tmp / "dst"],
            }[command]()

        return make

    def says(how: str) -> str:
        if command == "verify" and how in ("missing shard", "flipped byte"):
            return "1 problem(s) in"  # the shard is named on stdout, above
        return STORE_DAMAGE[how]

    def midway(how: str) -> bool:  # train, pursue and copy find a damaged shard when they reach it
        return (command in ("train", "pursue") and how in ("missing shard", "flipped byte")) or (
            command == "copy" and how == "flipped byte"
        )

    return {f"{command} on a store: {how}": Row(args(how), says(how), partial=midway(how)) for how in damages}


# fmt: off
ROWS: dict[str, Row] = {
    # -- harvest ----------------------------------------------------------------------------
    "harvest --out on a read-only mount": Row(lambda env: harvest(read_only(env)), "Read-only file system", needs="tmpfs"),
    "harvest --out without write permission": Row(lambda env: harvest(locked(env)), "Permission denied", needs="setpriv"),
    "harvest --out name too long": Row(lambda env: harvest(too_long(env)), "too long"),
    "harvest --out is a file": Row(lambda env: harvest(a_file(env)), "is a file, not a directory"),
    "harvest --out file:// URL": Row(lambda env: harvest(url_out(env, "file:///tmp/x")), "is a URL, but harvest writes to a local path or to object storage"),
    "harvest --device tpu": Row(lambda env: harvest(env.tmp / "s", "--device", "tpu"), "unknown --device 'tpu'"),
    "harvest random-bytes .jsonl": Row(lambda env: harvest(env.tmp / "s", "--dataset", noise(env, "n.jsonl")),
                                       "is not UTF-8 text"),
    "harvest random-bytes .parquet": Row(lambda env: harvest(env.tmp / "s", "--dataset", noise(env, "n.parquet")),
                                         "not a readable Parquet file"),
    "harvest random-bytes .txt": Row(lambda env: harvest(env.tmp / "s", "--dataset", noise(env, "n.txt")), "is not UTF-8 text"),
    "harvest Latin-1 .txt": Row(lambda env: harvest(env.tmp / "s", "--dataset", latin1(env)), "not UTF-8 text: byte 0xe9"),
    "harvest /dev/zero": Row(lambda env: harvest(env.tmp / "s", "--dataset", "/dev/zero"), "is a character device"),
    "harvest a FIFO": Row(lambda env: harvest(env.tmp / "s", "--dataset", fifo(env)), "FIFO"),
    "harvest a missing dataset file": Row(lambda env: harvest(env.tmp / "s", "--dataset", env.tmp / "gone.jsonl"), "gone.jsonl"),
    "harvest pickled pytorch_model.bin": Row(lambda env: harvest(env.tmp / "s", "--model", pickled_checkpoint(env)),
                                             "loads only safetensors weights"),
    "harvest truncated model.safetensors": Row(lambda env: harvest(env.tmp / "s", "--model", checkpoint_cut_short(env)),
                                               "model.safetensors is damaged"),
    "harvest checkpoint config.json not JSON": Row(lambda env: harvest(env.tmp / "s", "--model", checkpoint_config_not_json(env)),
                                                   "config.json is not JSON"),
    "harvest --out a finished store, no --resume": Row(lambda env: harvest(copy(env, env.store)), "--resume"),
    "harvest --resume with other --tokens": Row(lambda env: harvest(copy(env, env.store), "--resume"), "different metadata"),
    **store_rows("harvest --resume", ["zarr.json cut short", "n_rows 'lots'", "flipped byte", "missing shard"]),
    "harvest --overwrite a directory that is not a store": Row(lambda env: harvest(a_file(env).parent, "--overwrite"),
                                                               "not a saekit store; refusing to delete it"),
    **store_rows("harvest --overwrite", ["zarr.json cut short"]),
    "harvest onto a full disk": Row(lambda env: harvest(full_disk(env, 64 << 10), "--tokens", 2048, "--shard-rows", 512,
                                                        "--chunk-rows", 128), "disk full", needs="tmpfs", partial=True),
    # -- train ------------------------------------------------------------------------------
    "train --out on a read-only mount": Row(lambda env: train(env.store, read_only(env)), "Read-only file system", needs="tmpfs"),
    "train --out without write permission": Row(lambda env: train(env.store, locked(env)), "Permission denied", needs="setpriv"),
    "train --out name too long": Row(lambda env: train(env.store, too_long(env)), "too long"),
    "train --out is a file": Row(lambda env: train(env.store, a_file(env)), "is a file, not a directory"),
    "train --out s3:// URL": Row(lambda env: train(env.store, url_out(env, "s3://bucket/run")), "is a URL"),
    "train --device tpu": Row(lambda env: train(env.store, env.tmp / "run", "--device", "tpu"), "unknown --device 'tpu'"),
    "train --out a finished run, no --resume": Row(lambda env: train(env.store, copy(env, env.inputs.run)), "pass --resume"),
    "train --resume, config.json cut short": Row(lambda env: resume(damaged_run(env, "config.json")), "config.json is damaged"),
    "train --resume, state.json cut short": Row(lambda env: resume(damaged_run(env, "checkpoint/state.json")),
                                                "checkpoint is unreadable (JSONDecodeError)"),
    "train --resume, checkpoint weights cut short": Row(lambda env: resume(damaged_run(env, "checkpoint/model.safetensors")),
                                                        "checkpoint is unreadable (SafetensorError)"),
    "train --resume, run.json cut short": Row(lambda env: resume(damaged_run(env, "run.json")), "run.json is damaged"),
    "train --resume, metrics.jsonl random bytes": Row(lambda env: resume(noisy_metrics(env)), "metrics.jsonl line 1 is damaged"),
    'train --config normalize = "no"': Row(lambda env: ["train", "--config", toml(env, 'normalize = "no"')],
                                           "normalize must be true or false, got 'no'"),
    'train --config n-features = "lots"': Row(lambda env: ["train", "--config", toml(env, 'n-features = "lots"')],
                                              "n-features must be an integer, got 'lots'"),
    "train --config k = [1, 2]": Row(lambda env: ["train", "--config", toml(env, "k = [1, 2]")],
                                     "k must be an integer, got [1, 2]"),
    "train --config random bytes": Row(lambda env: ["train", "--config", noise(env, "c.toml")], "c.toml is not UTF-8 text"),
    "train --config /dev/zero": Row(lambda env: ["train", "--config", "/dev/zero"], "--config /dev/zero is not a regular file"),
    "train --k above --n-features": Row(lambda env: train(env.store, env.tmp / "run", "--k", 65),
                                        "--k 65 is larger than --n-features 64"),
    "train --from-pretrained of another width": Row(lambda env: train(env.store, env.tmp / "run", "--n-features", 0,
                                                                      "--from-pretrained", wide_sae(env)), "d_in=32"),
    "train --store missing": Row(lambda env: train(env.tmp / "gone", env.tmp / "run"), "gone"),
    **store_rows("train", ["missing shard", "flipped byte", "zarr.json cut short", "meta.ctx_len edited", "mean_sq_norm x1000"]),
    "train --unroll 9": Row(lambda env: train(env.store, env.tmp / "run", "--unroll", 9), "--unroll 9 must be in 0..8"),
    "train --unroll with Batch-TopK": Row(lambda env: train(env.store, env.tmp / "run", "--unroll", 1, "--activation", "batchtopk"),
                                          "--unroll refines TopK codes"),
    "train --distill -1": Row(lambda env: train(env.store, env.tmp / "run", "--distill", -1), "--distill -1.0 must be >= 0"),
    "train --distill with --codes pursuit": Row(lambda env: train(env.store, env.tmp / "run", "--distill", 1, "--codes", "pursuit"),
                                                "--distill trains the encoder"),
    "train --distill-codes without --distill": Row(lambda env: train(env.store, env.tmp / "run", "--distill-codes", env.tmp),
                                                   "--distill-codes needs --distill C > 0"),
    "train --distill-codes with a dictionary that trains": Row(lambda env: train(env.store, env.tmp / "run", "--distill", 1,
                                                                                 "--distill-codes", env.tmp), "this run trains its dictionary"),
    "train --distill-codes of another dictionary": Row(lambda env: distill(env, pursued(env, env.inputs.lens)), "another dictionary"),
    "train --distill-codes of the held-out rows only": Row(lambda env: distill(env, pursued(env, env.sae)),
                                                           "covers store rows [1792, 2048) but training reads rows [0, 1792)"),
    "train --distill-codes without the k's group": Row(lambda env: distill(env, pursued(env, env.sae, "--start-row", 0, "--rows", 1792)),
                                                       "has no codes group gp_k4 (it has gp_k2)"),
    "train onto a full disk": Row(lambda env: train(env.store, full_disk(env, 16 << 10)), "disk full",
                                  needs="tmpfs", partial=True),
    # -- pursue -----------------------------------------------------------------------------
    "pursue --out on a read-only mount": Row(lambda env: pursue(env.store, env.sae, read_only(env)), "Read-only file system",
                                             needs="tmpfs"),
    "pursue --out without write permission": Row(lambda env: pursue(env.store, env.sae, locked(env)), "Permission denied",
                                                 needs="setpriv"),
    "pursue --out name too long": Row(lambda env: pursue(env.store, env.sae, too_long(env)), "too long"),
    "pursue --out is a file": Row(lambda env: pursue(env.store, env.sae, a_file(env)), "is a file, not a directory"),
    "pursue --out gs:// URL": Row(lambda env: pursue(env.store, env.sae, url_out(env, "gs://bucket/p")), "is a URL"),
    "pursue --device tpu": Row(lambda env: pursue(env.store, env.sae, env.tmp / "o", "--device", "tpu"),
                               "unknown --device 'tpu'"),
    "pursue --sae without weights": Row(lambda env: pursue(env.store, sae_without_weights(env), env.tmp / "o"),
                                        "no sae.safetensors: the weights file is missing"),
    "pursue --sae truncated sae.safetensors": Row(lambda env: pursue(env.store, sae_cut_short(env), env.tmp / "o"),
                                                  "sae.safetensors is damaged"),
    "pursue --sae config.json not JSON": Row(lambda env: pursue(env.store, sae_config_not_json(env), env.tmp / "o"),
                                             "config.json is not valid JSON"),
    "pursue --sae sae-lens cfg.json d_in mismatch": Row(lambda env: pursue(env.store, lens_d_in_mismatch(env), env.tmp / "o"),
                                                        "cfg.json says d_in=16"),
    "pursue --sae of another width": Row(lambda env: pursue(env.store, wide_sae(env), env.tmp / "o"), "d_in=32"),
    "pursue --refine -1": Row(lambda env: pursue(env.store, env.sae, env.tmp / "o", "--method", "encoder+gp", "--refine", -1),
                              "--refine -1 must be >= 0"),
    "pursue --k above n_features": Row(lambda env: pursue(env.store, env.inputs.lens, env.tmp / "o", "--k", 65),
                                       "--k 65 is larger than the SAE's n_features 64"),
    **store_rows("pursue", ["missing shard", "flipped byte", "n_rows 'lots'", "hook ../../x", "mean_sq_norm x1000"]),
    "pursue --resume, codes.zarr/zarr.json cut short": Row(lambda env: pursue(env.store, env.sae, damaged_codes(env),
                                                                              "--resume"), "codes.zarr/zarr.json is damaged"),
    "pursue --downstream on a store without sequences": Row(lambda env: pursue(store_without_sequences(env), env.sae, env.tmp / "o",
                                                                               "--downstream"), "does not record how its rows form sequences"),
    "pursue --downstream on a store without token ids": Row(lambda env: pursue(store_without_tokens(env), env.sae, env.tmp / "o",
                                                                               "--downstream"), "tokens/c/0"),
    "pursue --downstream on a store that skipped 2 tokens": Row(lambda env: pursue(store_skipping_two(env), env.sae,
                                                                                   env.tmp / "o", "--downstream"), "cannot be rebuilt"),
    "pursue --downstream --rows fewer than a sequence": Row(lambda env: pursue(env.store, env.sae, env.tmp / "o", "--downstream",
                                                                               "--rows", 100), "hold no whole sequence"),
    "pursue --rows more than are held out": Row(lambda env: pursue(env.store, env.inputs.run, env.tmp / "o", "--rows", 300),
                                                "--rows 300 is more than the store's 256 held-out rows"),
    "pursue --start-row past the store": Row(lambda env: pursue(env.store, env.sae, env.tmp / "o", "--start-row", 2048),
                                             "--start-row 2048 is past the store's last row (2047)"),
    "pursue onto a full disk": Row(lambda env: pursue(env.store, env.sae, full_disk(env, 4 * 4096)), "disk full",
                                   needs="tmpfs", partial=True),
    # -- eval -------------------------------------------------------------------------------
    "eval --out is a file": Row(lambda env: evaluate(env.store, env.inputs.run, a_file(env)), "is a file, not a directory"),
    "eval --out memory:// URL": Row(lambda env: evaluate(env.store, env.inputs.run, url_out(env, "memory://e")), "is a URL"),
    "eval --out on a read-only mount": Row(lambda env: evaluate(env.store, env.inputs.run, read_only(env)),
                                           "Read-only file system", needs="tmpfs"),
    "eval --out not empty": Row(lambda env: evaluate(env.store, env.inputs.run, a_file(env).parent), "is not empty"),
    "eval --refine -1": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--refine", -1),
                            "--refine -1 must be >= 0"),
    "eval --device tpu": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--device", "tpu"),
                             "unknown --device 'tpu'"),
    "eval on a store without sequences": Row(lambda env: evaluate(store_without_sequences(env), env.inputs.run, env.tmp / "o"),
                                             "does not record how its rows form sequences"),
    "eval on a store without token ids": Row(lambda env: evaluate(store_without_tokens(env), env.inputs.run, env.tmp / "o"),
                                             "tokens/c/0"),
    "eval on a store that skipped 2 tokens": Row(lambda env: evaluate(store_skipping_two(env), env.inputs.run, env.tmp / "o"),
                                                 "cannot be rebuilt"),
    "eval --model that cannot be loaded": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--model",
                                                                   env.tmp / "gone"), "unknown model"),
    "eval --model of another shape": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--model", env.inputs.ckpt),
                                         "has no hook 'blocks.2.hook_resid_pre'"),
    "eval --model with other weights": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--model",
                                                                same_shape_model(env)), "differ from the cached ones by"),
    "eval --k above n_features": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--k", 65),
                                     "--k 65 is larger than the SAE's n_features 64"),
    "eval --sae of another width": Row(lambda env: evaluate(env.store, wide_sae(env), env.tmp / "o"), "d_in=32"),
    "eval --sequences more than the store has": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--sequences", 17),
                                                    "--sequences 17 is more than the store's 16 whole sequences"),
    "eval --codes of other rows": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--codes",
                                                           pursued(env, env.inputs.run, "--start-row", 0, "--rows", 256)),
                                      "cover store rows [0, 256)"),
    "eval --codes of another dictionary": Row(lambda env: evaluate(env.store, env.inputs.run, env.tmp / "o", "--codes",
                                                                   pursued(env, env.inputs.lens)), "another dictionary"),
    # -- dashboard --------------------------------------------------------------------------
    "dashboard --latents of an unknown id": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--latents", "3,64"),
                                                "--latents 64 is not a latent of"),
    "dashboard --latents not a list of ids": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--latents", "3;x"),
                                                 "is not a comma-separated list of latent ids"),
    "dashboard --top and --random": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--top", 3, "--random", 3),
                                        "pass one of --top, --random, not several"),
    "dashboard --codes of another dictionary": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--codes",
                                                                         pursued(env, env.inputs.lens)), "another dictionary"),
    "dashboard --codes without the SAE's k's group": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--codes",
                                                                               pursued(env, env.sae)), "have no group 'gp_k4'"),
    "dashboard --codes with a missing --group": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--codes",
                                                                          pursued(env, env.sae), "--group", "mp_k2"),
                                                    "have no group 'mp_k2'; pass --group, one of: gp_k2"),
    "dashboard --codes of other rows": Row(lambda env: dashboard(env.store, env.sae, env.tmp / "o", "--codes",
                                                                 pursued(env, env.sae, "--start-row", 0, "--rows", 256),
                                                                 "--group", "gp_k2"), "cover store rows [0, 256)"),
    "dashboard --out not empty": Row(lambda env: dashboard(env.store, env.sae, a_file(env).parent), "is not empty"),
    "dashboard --out is a file": Row(lambda env: dashboard(env.store, env.sae, a_file(env)), "is a file, not a directory"),
    "dashboard --out s3:// URL": Row(lambda env: dashboard(env.store, env.sae, url_out(env, "s3://bucket/d")), "is a URL"),
    # -- a store in object storage, through the shard cache -------------------------------------
    "train --cache-gb 0": Row(lambda env: train(env.store, env.tmp / "run", "--cache-gb", 0), "--cache-gb 0.0 must be positive"),
    "train --cache-gb inf": Row(lambda env: train(env.store, env.tmp / "run", "--cache-gb", "inf"), "--cache-gb inf must be a finite number"),
    "train --cache-gb nan": Row(lambda env: train(env.store, env.tmp / "run", "--cache-gb", "nan"), "--cache-gb nan must be a finite number"),
    "verify s3:// --cache-gb 1e300": Row(lambda env: ["verify", in_bucket(env), "--cache-gb", "1e300"], "--cache-gb 1e+300 is more than"),
    "train --lr inf": Row(lambda env: train(env.store, env.tmp / "run", "--lr", "inf"), "--lr inf must be a finite number"),
    "train --config with decay-frac = nan": Row(lambda env: train(env.store, env.tmp / "run", "--config",
                                                                   write(env.tmp / "c.toml", "decay-frac = nan\n")),
                                                "decay-frac must be a finite number, got nan"),
    "train --cache-dir s3:// URL": Row(lambda env: train(env.store, env.tmp / "run", "--cache-dir", "s3://b/c"), "is a URL"),
    "train --store in a bucket that does not exist": Row(lambda env: train(f"{bucket(env)}-gone/store", env.tmp / "run"),
                                                         "no store at s3://"),
    "train --store s3:// with a flipped byte in the bucket": Row(lambda env: train(in_bucket(env, damaged_store(env, "flipped byte")),
                                                                                   env.tmp / "run"),
                                                                 f"{SHARD} is corrupt in the bucket", partial=True),
    "train --store s3:// with --cache-gb below one shard": Row(lambda env: train(in_bucket(env), env.tmp / "run",
                                                                                 "--cache-gb", 0.0001), "raise --cache-gb", partial=True),
    "train --store s3:// with --cache-dir on a full disk": Row(lambda env: train(in_bucket(env), env.tmp / "run", "--cache-dir",
                                                                                 env.tmpfs(64 << 10) / "cache"),
                                                               "No space left on device", needs="tmpfs", partial=True),
    "pursue --store s3:// with --cache-dir of other files": Row(lambda env: pursue(in_bucket(env), env.sae, env.tmp / "p",
                                                                                   "--cache-dir", a_file(env).parent),
                                                                "not a saekit shard cache"),
    "verify s3:// with a flipped byte in the bucket": Row(lambda env: ["verify", in_bucket(env, damaged_store(env, "flipped byte"))],
                                                          "1 problem(s) in"),
    # -- info, verify, ls ---------------------------------------------------------------------
    "ls of a missing directory": Row(lambda env: ["ls", env.tmp / "gone"], "is not a directory"),
    "ls of a file:// URL": Row(lambda env: ["ls", "file:///tmp/cache"], "lists a local directory or object storage"),
    "info of a missing path": Row(lambda env: ["info", env.tmp / "gone"], "gone"),
    "info of a directory that is not a store": Row(lambda env: ["info", a_file(env).parent], "is not a saekit activation store"),
    **store_rows("info", ["zarr.json cut short", "n_rows 'lots'", "hook ../../x"]),
    **store_rows("verify", ["missing shard", "flipped byte", "hook ../../x", "meta.ctx_len edited", "mean_sq_norm x1000"]),
    # -- copy -------------------------------------------------------------------------------
    "copy of a missing SRC": Row(lambda env: ["copy", env.tmp / "gone", env.tmp / "dst"], "gone does not exist"),
    "copy from a URL fsspec does not know": Row(lambda env: ["copy", "nosuchscheme://b/store", env.tmp / "dst"],
                                                "use a URL fsspec knows"),
    "copy of an incomplete store": Row(lambda env: ["copy", incomplete_store(env), env.tmp / "dst"],
                                       "finish the harvest first"),
    **store_rows("copy", ["flipped byte", "missing shard", "zarr.json cut short", "meta.ctx_len edited"]),
    "copy onto itself": Row(lambda env: ["copy", env.store, env.store], "are the same place"),
    "copy --threads 0": Row(lambda env: ["copy", env.store, env.tmp / "dst", "--threads", 0], "--threads 0 must be positive"),
    "copy DST is a file": Row(lambda env: ["copy", env.store, a_file(env)], "is a file, not a directory"),
    "copy DST on a read-only mount": Row(lambda env: ["copy", env.store, read_only(env)], "Read-only file system",
                                         needs="tmpfs"),
    "copy DST without write permission": Row(lambda env: ["copy", env.store, locked(env)], "Permission denied",
                                             needs="setpriv"),
    "copy DST holding another store": Row(lambda env: ["copy", env.store, copy(env, env.inputs.demo / "store")],
                                          "holds another saekit store"),
    "copy --overwrite DST that is not a store": Row(lambda env: ["copy", env.store, a_file(env).parent, "--overwrite"],
                                                    "holds no saekit store; refusing to write into it or delete it"),
    "copy onto a full disk": Row(lambda env: ["copy", env.store, full_disk(env, 64 << 10)], "disk full", needs="tmpfs",
                                 partial=True),
    "copy to an S3 bucket that does not exist": Row(lambda env: ["copy", env.store, "s3://no-such-bucket/store"],
                                                    "not found", needs="s3"),
    # -- demo -------------------------------------------------------------------------------
    "demo --out is a file": Row(lambda env: demo(a_file(env)), "is a file, not a directory"),
    "demo --out s3:// URL": Row(lambda env: demo(url_out(env, "s3://bucket/demo")), "is a URL"),
    "demo --out name too long": Row(lambda env: demo(too_long(env)), "too long"),
    "demo --out on a read-only mount": Row(lambda env: demo(read_only(env)), "Read-only file system", needs="tmpfs"),
    "demo --device tpu": Row(lambda env: demo(env.tmp / "d", "--device", "tpu"), "unknown --device 'tpu'"),
    "demo rerun with other sizes": Row(lambda env: demo(env.inputs.demo, "--steps", 3), "holds a demo run with other sizes"),
    "demo --out a directory that is not a demo": Row(lambda env: demo(not_a_demo(env)), "is not empty"),
    "demo --out with a damaged demo.json": Row(lambda env: demo(demo_json_damaged(env)), "demo.json is damaged"),
}
# fmt: on


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path under `root` (but `skip`): a file's sha256, or what else it is."""
    seen = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        kind = "dir" if p.is_dir() else "file" if p.is_file() else "other"  # a FIFO is never read
        seen[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else kind
    return seen


def _needs(what: str) -> None:
    if what == "setpriv" and (os.geteuid() != 0 or not shutil.which("setpriv")):
        pytest.skip("needs root and setpriv to run a command as a user without root's permission override")


@pytest.mark.parametrize(
    "name",
    # a command run as another user is a subprocess: the slow lane
    [pytest.param(n, marks=pytest.mark.slow) if r.needs == "setpriv" else n for n, r in ROWS.items()],
)
def test_bad_input_is_one_line_and_changes_nothing(name, inputs, tmp_path, tmpfs, capsys, monkeypatch, request):
    row = ROWS[name]
    _needs(row.needs)
    if row.needs == "s3":
        request.getfixturevalue("s3_server")
    env = Env(inputs, tmp_path / "row", tmpfs, capsys, monkeypatch, request)
    env.tmp.mkdir()
    args = [str(a) for a in row.make(env)]
    shared = [p for p in inputs if any(a == str(p) or a.startswith(f"{p}/") for a in args)]
    out = Path(args[2] if args[0] == "copy" else args[args.index("--out") + 1]) if row.partial else None
    before = tree(env.tmp, skip=out), {p: tree(p) for p in shared}

    if row.needs == "setpriv":
        r = saekit(*args, prefix=NO_DAC)
        code, err = r.returncode, r.stderr
    else:
        code, _, err = in_process(capsys, monkeypatch, *args)

    one_error(code, err, row.says)
    assert (tree(env.tmp, skip=out), {p: tree(p) for p in shared}) == before

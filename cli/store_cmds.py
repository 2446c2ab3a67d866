"""`saekit info`, `saekit verify` and `saekit ls`: look at activation stores without loading them;
`saekit copy`: copy one to or from object storage."""

from __future__ import annotations

import json
import sys

import typer

from saekit.errors import SaekitError
from saekit.store import FORMAT_VERSION, InfoConfig, LsConfig, VerifyConfig, list_stores, open_store
from saekit.store.copy import CopyConfig, copy_store

from .commands import Command


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "unknown (remote store)"
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{size} B"
        n /= 1024
    raise AssertionError("unreachable")


def info(cfg: InfoConfig) -> None:
    """Show a store's hooks, rows, d_model, dtype, size, provenance, content hash and completeness."""
    st = open_store(
        cfg.store, allow_incomplete=True, check=False
    )  # info is how you find out a store is incomplete (or damaged)
    if cfg.as_json:
        attrs = {k: v for k, v in st.attrs.items() if k != "stats"}  # mean vectors are long
        typer.echo(json.dumps({**attrs, "path": str(st.path), "size_bytes": st.size_on_disk()}, indent=1))
        return
    lay = st.layout
    lines = [
        ("store", str(st.path)),
        (
            "complete",
            "yes"
            if st.complete
            else f"NO: incomplete, {st.n_rows:,} rows in finished shards so far (resume the harvest with --resume)",
        ),
        ("rows", f"{st.n_rows:,}"),
        ("hooks", ", ".join(f"{h} (d_model {d})" for h, d in lay.hooks.items())),
        ("dtype", "bfloat16 (bit patterns stored as uint16); tokens and positions int32"),
        ("layout", f"shards of {lay.shard_rows:,} rows, inner chunks of {lay.chunk_rows:,} rows, uncompressed"),
        ("size", _human_bytes(st.size_on_disk())),
        ("hash", st.content_hash or "(none until the store is complete)"),
    ]
    for h in st.hooks if st.n_rows else []:
        s = st.stats(h)
        lines.append(("stats", f"{h}: mean norm {float(s.mean.norm()):.4g}, mean squared norm {s.mean_sq_norm:.4g}"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        typer.echo(f"{k:<{width}}  {v}")
    typer.echo("provenance")
    for k, v in st.meta.items():
        typer.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def verify(cfg: VerifyConfig) -> None:
    """Recompute the content hash, every shard's checksum and the statistics; exit non-zero naming each problem."""
    st = open_store(  # verify checks every shard itself
        cfg.store, allow_incomplete=True, check=False, cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb
    )
    bad = st.verify(progress=sys.stderr.isatty() if cfg.progress is None else cfg.progress)
    for line in bad:
        typer.echo(f"bad: {line}")
    if bad:
        raise SaekitError(
            f"{len(bad)} problem(s) in {cfg.store} (listed above); re-harvest into a new store or restore the files from a copy"
        )
    what = "complete" if st.complete else "incomplete (finished shards only)"
    typer.echo(
        f"ok: {st.n_shards} shard(s), {st.n_rows:,} rows and statistics verified; store {what}; {st.content_hash or 'no hash yet'}"
    )
    if st.format_version < FORMAT_VERSION:
        typer.echo(
            f"note: store format {st.format_version}: its content hash does not cover the statistics (checked against "
            f"the rows here instead); re-harvest to get format {FORMAT_VERSION}"
        )


def ls(cfg: LsConfig) -> None:
    """List the saekit stores under ROOT (e.g. a shared cache), one line each; damaged ones say why."""
    found = list_stores(cfg.root)
    for s in found:
        typer.echo(f"{s.path}  {s.summary}")
    if not found:
        typer.echo(f"no saekit stores under {cfg.root}")


def copy(cfg: CopyConfig) -> None:
    """Copy a complete store to or from object storage (s3://, gs://, ...), checking every shard; rerun to resume."""
    r = copy_store(cfg)
    if r.already:
        typer.echo(f"{r.dst} already holds this store ({r.content_hash}); nothing to copy")
        return
    kept = f", {r.kept} already there" if r.kept else ""
    typer.echo(
        f"copied {cfg.src} -> {r.dst}: {r.copied} shard file(s){kept}, {r.bytes / 1e6:,.1f} MB in {r.seconds:.1f} s "
        f"({r.mb_per_s:,.1f} MB/s); {r.content_hash}"
    )


COPY_INTERRUPTED = (
    "DST is not a store until the copy finishes; rerun the same `saekit copy` to continue where it stopped"
)
COMMANDS = [
    Command("info", InfoConfig, info),
    Command("verify", VerifyConfig, verify),
    Command("ls", LsConfig, ls),
    Command("copy", CopyConfig, copy, interrupted=COPY_INTERRUPTED),
]

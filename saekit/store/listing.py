"""What the store commands take and show: `saekit info`, `verify` and `ls` (their configs), and
`list_stores`, every saekit store under a folder or a bucket prefix, one line each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from saekit.config import need
from saekit.errors import SaekitError, local_path
from saekit.store.format import attrs_of, read_attrs
from saekit.store.reader import ActivationStore, open_store
from saekit.store.remote import Remote, is_remote
from saekit.store.shard_cache import ShardCacheFields

# --------------------------------------------------------------------------------------------
# What `saekit info` and `saekit verify` take (one flag per field)
# --------------------------------------------------------------------------------------------


@dataclass
class InfoConfig:
    """A store's hooks, rows, d_model, dtype, size, provenance, content hash and completeness."""

    store: str = field(default="", metadata={"argument": "STORE"})
    """Store directory (or fsspec URL, e.g. file:///path)."""
    as_json: bool = field(default=False, metadata={"flag": "--json"})
    """Print the store's attributes as JSON."""

    def __post_init__(self) -> None:
        need(bool(self.store), "STORE is required: the store directory (or fsspec URL) to show")


@dataclass
class VerifyConfig(ShardCacheFields):
    """Recompute a store's content hash, every shard's checksum and the statistics."""

    store: str = field(default="", metadata={"argument": "STORE"})
    """Store directory (or fsspec URL)."""
    progress: bool | None = None
    """Show a progress bar; default: when stderr is a terminal."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --cache-dir, --cache-gb
        need(bool(self.store), "STORE is required: the store directory (or fsspec URL) to verify")


@dataclass
class LsConfig:
    """The saekit stores under a directory (a shared cache root), one line each."""

    root: str = field(default="", metadata={"argument": "ROOT"})
    """Directory or URL to search (cache, s3://bucket/cache); not inside a store."""

    def __post_init__(self) -> None:
        need(bool(self.root), "ROOT is required: the directory holding stores (e.g. cache)")


class StoreListing(NamedTuple):
    """One store found by `list_stores`."""

    path: Path | str
    summary: str
    """`info`'s essentials on one line, or why the store cannot be read."""
    ok: bool


def list_stores(root: str | os.PathLike) -> list[StoreListing]:
    """Every saekit store under `root` (a local directory, or a URL: s3://bucket/cache), sorted by
    path. A damaged one is listed with what is wrong, not skipped, so a shared cache shows
    everything it holds."""
    if is_remote(root):
        return _list_remote(Remote(str(root)))
    base = local_path(
        root, "ROOT", "`saekit ls` lists a local directory or object storage (s3://...): pass a plain path"
    )
    if not base.is_dir():
        raise SaekitError(f"ROOT {root} is not a directory: pass the directory holding stores (e.g. cache)")
    found = []
    for here, dirs, files in os.walk(base):
        dirs.sort()
        if "zarr.json" not in files:
            continue
        try:
            if read_attrs(here) is None:
                continue  # another program's zarr group: keep looking inside it
            found.append(StoreListing(Path(here), _summary(open_store(here, allow_incomplete=True, check=False)), True))
        except SaekitError as e:
            found.append(StoreListing(Path(here), f"unreadable: {e}", False))
        dirs.clear()  # a store's own directories hold no other store
    return found


def _list_remote(remote: Remote) -> list[StoreListing]:
    """`list_stores` of a folder in object storage: one listing, then each group's zarr.json."""
    names = remote.list()
    if not names and not remote.exists():
        raise SaekitError(f"ROOT {remote.url} is not there: check the bucket and the prefix")
    groups = sorted({n[: -len("zarr.json")].rstrip("/") for n in names if n == "zarr.json" or n.endswith("/zarr.json")})
    found, stores = [], []
    for d in groups:  # sorted: a store comes before its own folders, which hold no other store
        if any(s == "" or d.startswith(s + "/") for s in stores):
            continue
        where = f"{remote.url}/{d}" if d else remote.url
        try:
            if attrs_of(remote.read_bytes(f"{d}/zarr.json" if d else "zarr.json") or b"", where) is None:
                continue  # another program's zarr group
            found.append(StoreListing(where, _summary(open_store(where, allow_incomplete=True, check=False)), True))
        except SaekitError as e:
            found.append(StoreListing(where, f"unreadable: {e}", False))
        stores.append(d)
    return found


def _summary(st: ActivationStore) -> str:
    meta = st.meta

    def name(v: Any, key: str) -> str:  # harvest records dicts ({"name": ...}); stores made by hand, strings
        return str(v.get(key, "?")) if isinstance(v, dict) else str(v if v is not None else "?")

    model, data = name(meta.get("model"), "name"), name(meta.get("dataset"), "source")
    hooks = ", ".join(f"{h} ({d})" for h, d in st.layout.hooks.items())
    state = "complete" if st.complete else "INCOMPLETE (harvest --resume finishes it): so far"
    digest = (st.content_hash or "no hash yet")[:19]
    return f"{state}  {st.n_rows:,} rows  {hooks}  model {model}  data {data}  ctx {meta.get('ctx_len', '?')}  {digest}"

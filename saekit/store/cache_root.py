"""A shared cache root: stores named by what they are, found instead of recomputed.

A cache root (`--cache-root`, else $SAEKIT_CACHE, else ./cache; a local folder or a URL) holds
stores at

    <root>/<model>/<dataset>-<identity hash>/<hook>[+<hook>...]

The identity is everything in a harvest's metadata that decides the bytes of a row: the model (and
its weights' fingerprint), the dataset (its source, configuration, split, column, version or
content hash), the tokenizer, the context length, the packing and skip rule, the model's device
type and dtype, the stored dtype. It leaves out what only says how many rows there are or where a
file was read from (`tokens`, local paths, the saekit version).

Row r of a harvest does not depend on how many rows it asked for, so a store with more rows or more
hooks serves a smaller request as it is, and a store with fewer rows is extended in place: its
finished shards are kept, its last (partial) shard and the new ones are written, and its
attributes, which stay complete and valid until then, are replaced in one write at the end.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from saekit.errors import SaekitError, check_url, url_scheme
from saekit.store.format import attrs_of, canonical_json, check_attrs, read_attrs
from saekit.store.remote import Remote, is_remote

DEFAULT_ROOT = "cache"
# Metadata that does not decide a row's bytes: how many rows, which hooks (matched separately),
# where files were read from, which saekit wrote it.
NOT_IDENTITY = ("tokens", "hooks", "saekit_version", "stage")
PATHS = ("path",)


def cache_root(flag: str | None) -> str:
    """The cache root in force: --cache-root, else $SAEKIT_CACHE, else ./cache."""
    text = flag or os.environ.get("SAEKIT_CACHE") or DEFAULT_ROOT
    if url_scheme(text) is not None:
        return check_url(text, "--cache-root" if flag else "$SAEKIT_CACHE")
    return text.rstrip("/") or "/"


def identity(meta: dict) -> dict:
    """The part of a harvest's metadata that decides every row's bytes."""
    out = {k: v for k, v in meta.items() if k not in NOT_IDENTITY}
    for part in ("model", "dataset"):
        if isinstance(out.get(part), dict):
            out[part] = {k: v for k, v in out[part].items() if k not in PATHS}
    return out


def identity_hash(meta: dict) -> str:
    return hashlib.sha256(canonical_json(identity(meta)).encode()).hexdigest()[:12]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", s).strip("-") or "x"


def identity_dir(model_name: str, dataset_name: str, meta: dict) -> str:
    """`<model>/<dataset>-<identity hash>`, relative to the cache root."""
    return f"{_slug(model_name)}/{_slug(dataset_name)}-{identity_hash(meta)}"


def store_name(hooks: list[str]) -> str:
    """The store's folder: its hooks, sorted (the same hooks in another order are the same request)."""
    return _slug("+".join(sorted(hooks)))


class Found(NamedTuple):
    """What the cache root holds for a request."""

    action: str
    """'reuse' (a complete store serves it), 'extend' (a complete one with fewer rows),
    'resume' (an unfinished one of these hooks), or 'new'."""
    path: str
    """The store to use, extend, resume or create (a local path or a URL)."""
    n_rows: int
    hooks: list[str]
    content_hash: str = ""
    shard_rows: int = 0
    chunk_rows: int = 0
    """The found store's layout (0 for a new one): an extension keeps it."""
    meta: dict | None = None
    """An unfinished store's metadata: resuming adopts it (it may name other local paths)."""


def store_path(root: str, rel: str, hooks: list[str]) -> str:
    """Where the store of `hooks` of the identity folder `rel` lives in the cache root."""
    return _join(root, f"{rel}/{store_name(hooks)}")


def _join(root: str, rel: str) -> str:
    return f"{root}/{rel}" if is_remote(root) else str(Path(root) / rel)


def _stores_under(root: str, rel: str) -> list[tuple[str, dict]]:
    """(location, attributes) of each saekit store directly inside <root>/<rel>."""
    found = []
    if is_remote(root):
        remote = Remote(_join(root, rel))
        for name in sorted(remote.list()):
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == "zarr.json":
                where = f"{remote.url}/{parts[0]}"
                found.append((where, lambda n=name, w=where: attrs_of(remote.read_bytes(n) or b"", w)))
    else:
        base = Path(root) / rel
        found = (
            [(str(d), lambda d=d: read_attrs(d)) for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
        )
    out = []
    for where, read in found:
        try:  # a damaged sibling is skipped (`saekit ls` names it), never in the way of the others
            attrs = read()
            if attrs is not None:
                check_attrs(where, attrs)
                out.append((where, attrs))
        except SaekitError:
            continue
    return out


def find(root: str, rel: str, hooks: list[str], tokens: int, meta: dict) -> Found:
    """What to do for a harvest of `hooks` x `tokens` rows with metadata `meta` in <root>/<rel>."""
    want = set(hooks)
    key = canonical_json(identity(meta))
    serves, grows = [], []
    for where, attrs in _stores_under(root, rel):
        if canonical_json(identity(attrs.get("meta", {}))) != key or not want <= set(attrs.get("hooks", {})):
            continue
        if not attrs.get("complete"):
            continue
        n, asked = int(attrs.get("n_rows") or 0), int(attrs["meta"].get("tokens", 0))
        # a store that ran out of text holds all there is for any request up to what it asked for
        (serves if n >= tokens or asked >= tokens else grows).append((n, where, attrs))
    if serves:  # the smallest that serves: the least to read, and the same one every time
        n, where, attrs = min(serves, key=lambda t: (t[0], len(t[2]["hooks"]), t[1]))
        return _found("reuse", where, attrs)
    if grows:  # the largest: the least to compute
        n, where, attrs = max(grows, key=lambda t: (t[0], -len(t[2]["hooks"]), t[1]))
        return _found("extend", where, attrs)
    path = store_path(root, rel, hooks)
    unfinished = dict(_stores_under(root, rel)).get(path)
    if unfinished is None:
        return Found("new", path, 0, hooks)
    if canonical_json(identity(unfinished["meta"])) != key:
        raise SaekitError(f"{path} holds a store of other data; remove it, or pass --out")
    asked = unfinished["meta"].get("tokens")
    if asked != tokens:
        raise SaekitError(
            f"an unfinished harvest of {asked} tokens is at {path}: finish it first with --tokens {asked} "
            "(then ask for more, which extends it), or remove it"
        )
    return Found("resume", path, 0, hooks, meta=unfinished["meta"])


def _found(action: str, where: str, attrs: dict) -> Found:
    return Found(
        action,
        where,
        int(attrs["n_rows"]),
        list(attrs["hooks"]),
        attrs.get("content_hash", ""),
        int(attrs["shard_rows"]),
        int(attrs["chunk_rows"]),
    )

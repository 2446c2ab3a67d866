"""The codes store: sparse codes of a store's rows, written by `saekit pursue`.

    OUT/codes.zarr/               Zarr v3 group (format 'saekit-codes'), shards of the store's size
        rows                      [N] int64 store row of each code row: start_row, start_row + 1, ...
        <method>_k<k>/indices     [N, k] int32 atom indices (unused slots hold value 0)
        <method>_k<k>/values      [N, k] float32 coefficients, all >= 0
        .saekit-shards/<array group>/shard-NNNNNN.json   per-shard completion record (crc32c, seconds)
        .saekit-creating          marker, only while the empty codes store is being created

Shards are written whole, each followed by its record, and the group is created recognisably, all
through `saekit.store.shards` (the activation store's mechanism); a shard without a valid record is
recomputed on `saekit pursue --resume`. Read the codes back with `open_codes`.

The codes cover N consecutive store rows from `start_row` (an attribute; 0 for codes written
before it existed). Their shards count from there: shard i holds code rows [i * shard_rows, ...),
store rows start_row + those. So with start_row 0 shard i covers the rows of the store's shard i;
at any other start the shard boundaries differ from the store's, and every shard but the last is
still whole.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.pursuit import SparseCodes
from saekit.store.shards import (
    RECORDS_DIR,
    ShardRecord,
    crc32c_of,
    create_marked_group,
    create_sharded_array,
    read_group_attrs,
    read_record,
    shard_key,
    write_group_attrs,
    write_recorded_shard,
)

CODES_DIR = "codes.zarr"
CODES_FORMAT = "saekit-codes"
CODES_FORMAT_VERSION = 1
ROWS = "rows"
# The arrays of one (method, k) group: name, dtype, description.
_PARTS = (
    ("indices", "int32", "atom index of each nonzero slot"),
    ("values", "float32", "coefficient of each slot (>= 0)"),
)


# Methods whose name is not a safe zarr node / file name ('+'), stored under a short one.
_GROUP_PREFIX = {"encoder+gp": "egp"}


def group_name(method: str, k: int) -> str:
    """The codes.zarr group holding `method`'s codes at `k` (`encoder+gp`'s: egp_k<k>)."""
    return f"{_GROUP_PREFIX.get(method, method)}_k{k}"


def dictionary_sha256(sae: Any) -> str:
    """Hash of the raw-space dictionary (W_dec, b_dec) bytes: identifies the codes' dictionary
    (recorded in the codes' attributes, checked by whoever reads the codes back)."""
    W, b = sae.decoder.raw_dictionary()
    h = hashlib.sha256()
    for t in (W, b):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def encoder_sha256(sae: Any) -> str:
    """Hash of the encoder's parameters and buffers: identifies the encoder that codes started from
    (`refit`, `encoder+gp`)."""
    h = hashlib.sha256()
    for name, t in sorted(sae.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def read_codes_attrs(root: Path) -> dict | None:
    """The attributes of the codes store at `root`; None when there is none (a damaged zarr.json is an error)."""
    return read_group_attrs(root, CODES_FORMAT, what="saekit codes", redo="run `saekit pursue` again")


class CodesStore:
    """`OUT/codes.zarr`: the rows array and one (indices, values) group per (method, k).

    Write with `CodesStore.create` + `write` + `finalize`; read with `open_codes`. Arrays use
    the activation store's shard size, counted from the first code row (store row `start_row`).
    `codes(group, start, stop)` takes code rows; store row r is code row r - start_row.
    """

    def __init__(self, root: Path, attrs: dict):
        self.root = root
        self.attrs = attrs
        self.n_rows: int = int(attrs["n_rows"])
        self.shard_rows: int = int(attrs["shard_rows"])
        self.chunk_rows: int = int(attrs["chunk_rows"])
        self.start_row: int = int(attrs.get("start_row", 0))
        """Store row of the first code row (codes before saekit recorded it start at 0)."""
        self.groups: dict[str, int] = {g: int(v["k"]) for g, v in attrs["groups"].items()}
        """group name -> k"""
        self.methods: dict[str, str] = {g: str(v["method"]) for g, v in attrs["groups"].items()}
        """group name -> pursuit method"""

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.shard_rows)

    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_rows, min((index + 1) * self.shard_rows, self.n_rows)

    @staticmethod
    def _keys(group: str) -> list[str]:
        return [ROWS] if group == ROWS else [f"{group}/indices", f"{group}/values"]

    def _records(self, group: str) -> Path:
        return self.root / RECORDS_DIR / group

    @classmethod
    def create(
        cls, root: Path, *, identity: dict, groups: dict[str, dict], n_rows: int, shard_rows: int, chunk_rows: int
    ) -> CodesStore:
        """A new, empty codes store at `root` (which must not exist). groups: name -> {method, k}."""
        attrs = {
            "format": CODES_FORMAT,
            "format_version": CODES_FORMAT_VERSION,
            **identity,
            "groups": groups,
            "n_rows": n_rows,
            "shard_rows": shard_rows,
            "chunk_rows": chunk_rows,
            "complete": False,
        }
        sharding = {"shard_rows": shard_rows, "chunk_rows": chunk_rows}

        def build(zgroup) -> None:
            create_sharded_array(
                zgroup, ROWS, (n_rows,), "int64", **sharding, attrs={"description": "store row of each code row"}
            )
            for name, g in groups.items():
                k = int(g["k"])
                for part, dtype, what in _PARTS:
                    about = {"method": g["method"], "k": k, "description": what}
                    create_sharded_array(zgroup, f"{name}/{part}", (n_rows, k), dtype, **sharding, attrs=about)

        create_marked_group(
            root, attrs, build, "saekit pursue is creating codes here; if it is not running, rerun it with --resume\n"
        )
        return cls(root, attrs)

    def record(self, group: str, index: int) -> ShardRecord | None:
        """The completion record of shard `index` of `group`, or None (then the shard is redone)."""
        rec = read_record(self._records(group), index)
        seconds = rec.extra.get("seconds") if rec is not None else None
        return rec if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None

    def seconds(self, group: str) -> float:
        """Compute time of `group`'s codes, summed over its shards (every shard must be written)."""
        total = 0.0
        for i in range(self.n_shards):
            rec = self.record(group, i)
            if rec is None:
                raise SaekitError(
                    f"codes {self.root}: shard {i} of {group} has no record; rerun `saekit pursue` with --resume"
                )
            total += rec.extra["seconds"]
        return total

    def write(self, group: str, index: int, arrays: dict[str, np.ndarray], seconds: float) -> None:
        """Write shard `index` of `group` whole. arrays: key -> [rows of the shard, ...] (unpadded)."""
        start, stop = self.shard_range(index)
        write_recorded_shard(
            self.root,
            self._records(group),
            index,
            arrays,
            stop - start,
            shard_rows=self.shard_rows,
            chunk_rows=self.chunk_rows,
            extra=lambda: {"seconds": float(seconds)},
        )

    def read(self, group: str, index: int) -> dict[str, np.ndarray] | None:
        """Shard `index` of `group` (key -> valid rows), or None when it has no record or fails its checksum."""
        return self._load(group, index)[0]

    def _load(self, group: str, index: int) -> tuple[dict[str, np.ndarray] | None, str]:
        """(key -> valid rows of shard `index` of `group`, checked against its record, "") or (None, what is wrong)."""
        import zarr  # lazy: zarr takes about a second to import and `saekit --help` must stay fast

        rec = self.record(group, index)
        if rec is None:
            return None, f"shard {index} of {group} has no completion record"
        start, stop = self.shard_range(index)
        out = {}
        for key in self._keys(group):
            name = shard_key(key, 1 if key == ROWS else 2, index)
            if not (self.root / name).is_file():  # zarr would read a missing shard as zeros
                return None, f"shard {name} is missing"
            try:
                out[key] = np.asarray(zarr.open_array(str(self.root / key), mode="r")[start:stop])
            except Exception as e:  # a torn shard file: zarr raises many types
                return None, f"shard {name} is unreadable ({type(e).__name__})"
            if crc32c_of(out[key]) != rec.crc32c.get(key):
                return None, f"shard {name} is corrupt (checksum mismatch)"
        return out, ""

    def _checked_rows(self, group: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of each array of `group`, every shard they touch checked against its record."""
        if not 0 <= start <= stop <= self.n_rows:
            raise SaekitError(f"rows [{start}, {stop}) are outside the codes' {self.n_rows} rows")
        first = min(start // self.shard_rows, self.n_shards - 1)
        parts: dict[str, list[np.ndarray]] = {key: [] for key in self._keys(group)}
        for i in range(first, max(first + 1, math.ceil(stop / self.shard_rows))):
            arrays, problem = self._load(group, i)
            if arrays is None:
                raise SaekitError(f"codes {self.root}: {problem}; rerun `saekit pursue ... --resume` to recompute it")
            lo = i * self.shard_rows
            for key, v in arrays.items():
                parts[key].append(v[max(start, lo) - lo : max(stop, lo) - lo])
        return {key: np.concatenate(v) for key, v in parts.items()}

    def finalize(self) -> None:
        """Mark complete (every shard of every group has a record)."""
        missing = [(g, i) for g in [ROWS, *self.groups] for i in range(self.n_shards) if self.record(g, i) is None]
        if missing:
            raise SaekitError(f"{self.root}: shard {missing[0][1]} of {missing[0][0]} is missing; rerun with --resume")
        self.attrs["complete"] = True
        write_group_attrs(self.root, self.attrs)

    # -- reading --------------------------------------------------------------------------------

    def rows(self) -> torch.Tensor:
        """Store row of every code row: int64 [n_rows]."""
        return torch.from_numpy(self._checked_rows(ROWS, 0, self.n_rows)[ROWS])

    def codes(self, group: str, start: int = 0, stop: int | None = None) -> SparseCodes:
        """Codes of rows [start, stop) of `group`: indices int64 [n, k], values float32 [n, k]."""
        if group not in self.groups:
            raise SaekitError(f"{self.root} has no codes group {group!r}; it has: {', '.join(self.groups)}")
        got = self._checked_rows(group, start, self.n_rows if stop is None else stop)
        return SparseCodes(torch.from_numpy(got[f"{group}/indices"]).long(), torch.from_numpy(got[f"{group}/values"]))


def open_codes(path: str | os.PathLike, allow_incomplete: bool = False) -> CodesStore:
    """Open the codes written by `saekit pursue`: OUT or OUT/codes.zarr."""
    root = Path(path)
    if (root / CODES_DIR).is_dir():
        root = root / CODES_DIR
    attrs = read_codes_attrs(root)
    if attrs is None:
        raise SaekitError(f"{path} holds no saekit codes; pass the --out directory of `saekit pursue`")
    if int(attrs.get("format_version", 0)) > CODES_FORMAT_VERSION:
        raise SaekitError(f"{root} has codes format {attrs['format_version']}; upgrade saekit to read it")
    if not attrs.get("complete") and not allow_incomplete:
        raise SaekitError(
            f"codes in {root} are incomplete (the run was interrupted); finish it with `saekit pursue ... --resume`"
        )
    return CodesStore(root, attrs)


def open_codes_for(path: str | os.PathLike, what: str, store: Any, hook: str, sae: Any, sae_name: str) -> CodesStore:
    """The codes `saekit pursue` wrote at `path`, refused in one line unless they were computed from
    `store`'s contents and `hook`, against `sae`'s dictionary. `what` names them in the message
    ('--codes OUT'), `sae_name` the SAE ('--sae runs/x')."""
    codes = open_codes(path)
    a = codes.attrs
    if a.get("store_hash") != store.content_hash or a.get("hook") != hook:
        raise SaekitError(
            f"{what} come from another store or hook ({a.get('hook')}): pass codes that `saekit pursue` made from this store's {hook}"
        )
    if a.get("dictionary_sha256") != dictionary_sha256(sae):
        raise SaekitError(
            f"{what} were computed against another dictionary than {sae_name}'s: pass the codes made with it"
        )
    return codes

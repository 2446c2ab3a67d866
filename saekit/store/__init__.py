"""The activation cache: a Zarr v3 group of bf16 activations, token ids and positions.

Layout of a store (see docs/cache.md):

    <store>/zarr.json            group; attributes hold format, provenance (`meta`), hooks, layout,
                                 statistics, per-shard checksums, content hash, completeness
    <store>/acts/<hook>          [n_rows, d_model] uint16 = bf16 bit patterns, sharded, uncompressed
    <store>/tokens               [n_rows] int32 token id of every row
    <store>/positions            [n_rows] int32 position of every row in its sequence
    <store>/.saekit-shards/      per-shard completion records while writing (gathered at finalize)
    <store>/.saekit-creating     marker file, only while create_store builds the empty store

This module is the store's public face; the work lives in:

    saekit.store.format   names, layout, bf16 encoding, attribute checks, content hash, statistics
    saekit.store.writer   create_store, StoreWriter: whole shards, resume, several ranks
    saekit.store.reader   open_store, ActivationStore: memory-mapped reads, checks, verify;
                          InfoConfig, VerifyConfig, LsConfig (what `saekit info` / `verify` / `ls` take), list_stores
    saekit.store.shuffle        shuffle_plan and the shuffled batch stream
    saekit.store.shards         what both saekit stores share: shard files, completion records,
                          atomic attributes, recognisable creation
"""

from saekit.store.format import (
    ACTS,
    FORMAT_VERSION,
    HookStats,
    StoreLayout,
    bf16_bits,
    bits_to_bf16,
    content_hash,
    read_attrs,
)
from saekit.store.listing import InfoConfig, LsConfig, VerifyConfig, list_stores
from saekit.store.reader import ActivationStore, open_store
from saekit.store.shards import RECORDS_DIR, write_json_atomic
from saekit.store.shuffle import Window, shuffle_plan
from saekit.store.writer import StoreWriter, create_store

__all__ = [
    "ACTS",
    "FORMAT_VERSION",
    "RECORDS_DIR",
    "ActivationStore",
    "HookStats",
    "InfoConfig",
    "LsConfig",
    "StoreLayout",
    "StoreWriter",
    "VerifyConfig",
    "Window",
    "bf16_bits",
    "bits_to_bf16",
    "content_hash",
    "create_store",
    "list_stores",
    "open_store",
    "read_attrs",
    "shuffle_plan",
    "write_json_atomic",
]

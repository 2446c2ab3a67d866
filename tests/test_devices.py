"""saekit.devices: one dtype table for every stage, and process groups that stay the caller's.

(The same one-line error for a bad --device in every command is checked in test_cli.py.)"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from saekit.devices import DTYPES, resolve_dtype
from saekit.errors import SaekitError
from saekit.sae import SAEConfig, SparseAutoencoder

CPU = torch.device("cpu")


def test_device_and_dtype_defaults():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(None) == torch.float32  # no device: an SAE's default
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(SaekitError, match="unknown --dtype 'int8'"):
        resolve_dtype("int8", CPU, what="--dtype")


# What a user writes -> the dtype meant and the name a saved config holds (written out here, not
# read from saekit's own table, so a wrong entry there fails).
EXPECTED = {
    "float32": (torch.float32, "float32"),
    "fp32": (torch.float32, "float32"),
    "torch.float32": (torch.float32, "float32"),
    "bfloat16": (torch.bfloat16, "bfloat16"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "torch.bfloat16": (torch.bfloat16, "bfloat16"),
    "float16": (torch.float16, "float16"),
    "fp16": (torch.float16, "float16"),
    "float64": (torch.float64, "float64"),
    "fp64": (torch.float64, "float64"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_dtype_name_means_the_same_in_an_sae_as_in_harvest(name, tmp_path):
    """One table: harvest's short names (bf16, fp32, fp16) work for an SAE, and the SAE's long
    names for harvest; a saved config always holds the long name, and loads back as that dtype."""
    dtype, saved = EXPECTED[name]
    assert resolve_dtype(name, CPU) == dtype
    sae = SparseAutoencoder(d_in=4, n_features=8, k=2, dtype=name)
    assert sae.dtype == dtype and sae.config.dtype == saved
    assert SparseAutoencoder.load(sae.save(tmp_path / "sae")).dtype == dtype
    assert set(DTYPES) <= set(EXPECTED)  # every name saekit takes is checked here


def test_an_unknown_sae_dtype_is_one_line():
    with pytest.raises(SaekitError) as e:
        SAEConfig(d_in=4, n_features=8, k=2, dtype="int8")
    assert "\n" not in str(e.value) and "unknown dtype 'int8'" in str(e.value) and "bfloat16" in str(e.value)


# --- a process group the caller started outlives every stage ---------------------------------

# The caller starts a gloo group of world size 1 (WORLD_SIZE is not set: saekit sees a single
# process and must leave the group alone), runs a stage through the library, then uses the group.
_CALLER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as td

    td.init_process_group("gloo", rank=0, world_size=1)
    stage, out = sys.argv[1], sys.argv[2]
    if stage == "harvest":
        from saekit.harvest import HarvestConfig, run
        run(HarvestConfig(out=out, tokens=2048, shard_rows=1024, chunk_rows=512, device="cpu", progress=False))
    else:
        from saekit.train import TrainConfig
        from saekit.train import run
        run(TrainConfig(store=sys.argv[3], out=out, n_features=64, k=4, batch_size=256, tokens=512, eval_rows=256,
                        device="cpu", progress=False))
    print("group kept" if td.is_initialized() else "group destroyed")
    td.all_reduce(torch.ones(1))  # the caller can still use its group
    td.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", ["harvest", "train"])
@pytest.mark.slow
def test_a_stage_keeps_the_process_group_its_caller_owns(tmp_path, embedded_store, stage):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _CALLER, stage, str(tmp_path / "out"), str(embedded_store)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**_inherited_env(), **env})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "group kept"


def _inherited_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels saekit needs on the lent GPU machine
# (kind nvidia-h200: Python 3.12, x86_64, no network) that its image lacks, into .whl/ (or DEST).
#
#     PYTHON=/path/to/venv/bin/python bench/gpu_wheels.sh [DEST]
#
# The set: walk the Requires-Dist of saekit, sae-lens, transformer-lens, zarr and datasets as
# PYTHON's environment has them installed, skipping what the device image already holds (DEVICE
# below, its package list of 2026-11-17) and what saekit never imports there (DROP below), plus
# the few the device has in a version that may be too old (ALSO below). Each wheel is the
# version PYTHON's environment has (cp312 manylinux x86_64, or a pure-Python one);
# a package without such a wheel at that version is reported and the script fails.
# docs/gpu.md says how the device installs them (`pip install --target`, then PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12} # the device's Python; another value only to rehearse the install here

# The device image's packages (KINDS.md, nvidia-h200, read on 2026-11-17): never carried.
DEVICE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

# Required by sae-lens but never imported on saekit's paths (harvest, train and its sae-lens
# export, pursue, eval): `import sae_lens` loads none of them (9.7 MB of plotly, 1.7 MB of nltk,
# babe's chain; py2store and transformers-stream-generator have no wheel at all). saekit itself
# is not a wheel: it runs from the checkout that travels with the call.
DROP="saekit plotly plotly-express nltk babe transformers-stream-generator"

# On the device, but carried anyway: pydantic-core (which wandb, which sae-lens imports) needs a
# typing-extensions with `Sentinel` (4.14+); the image's version is not known, and a newer one
# shadows it harmlessly (PYTHONPATH=/tmp/site comes first).
ALSO="typing-extensions"

pins=$(
  DEVICE="$DEVICE" DROP="$DROP" ALSO="$ALSO" PYVER="$PYVER" "$PYTHON" - <<'EOF'
import os, re
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
skip = {norm(n) for n in os.environ["DEVICE"].split() + os.environ["DROP"].split()}
env = {"python_version": os.environ["PYVER"], "python_full_version": os.environ["PYVER"] + ".0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
also = os.environ["ALSO"].split()
skip -= {norm(n) for n in also}
seen, todo = {}, ["saekit", "sae-lens", "transformer-lens", "zarr", "datasets", *also]
while todo:
    name = todo.pop()
    if norm(name) in seen:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        raise SystemExit(f"gpu_wheels: {name} is not installed in this Python's environment: set PYTHON to saekit's venv")
    seen[norm(name)] = dist.version
    for r in map(Requirement, dist.requires or []):
        if (r.marker is None or r.marker.evaluate(env)) and norm(r.name) not in skip:
            todo.append(r.name)
for name, version in sorted(seen.items()):
    if name not in skip:
        print(f"{name}=={version}")
EOF
)

mkdir -p "$DEST"
# Ignored here too (.gitignore has /.whl/ for clones): the device's copy of the tree must not
# send the wheels twice, and `git status` stays clean.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
# pip matches a manylinux_2_N tag only for the N named: the common ones, then the rarer ones.
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plats+=(--platform "$p")
done
more=()
for n in 24 31 34 35 39; do more+=(--platform "manylinux_2_${n}_x86_64"); done
failed=()
for pin in $pins; do
  args=(download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp -d "$DEST" "$pin")
  "$PYTHON" -m pip "${args[@]}" "${plats[@]}" >/dev/null 2>&1 ||
    "$PYTHON" -m pip "${args[@]}" "${plats[@]}" "${more[@]}" >/dev/null 2>&1 ||
    failed+=("$pin")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_wheels: no cp${PYVER/./} manylinux x86_64 wheel for: ${failed[*]}" >&2
  exit 1
fi
# One version of each package only: two stop the device's whole install.
dupes=$(ls "$DEST" | grep '\.whl$' | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: $DEST holds two versions of: $dupes (delete $DEST and rerun)" >&2
  exit 1
fi
ls -l "$DEST" | awk '/\.whl$/ {printf "%9.1f KiB  %s\n", $5 / 1024, $9}'
echo "wheels:       $(du -sh "$DEST" | cut -f1) ($(ls "$DEST" | grep -c '\.whl$') files)"
echo "tree:         $(git ls-files -z -co --exclude-standard | du -ch --files0-from=- | tail -1 | cut -f1) (tracked and untracked-not-ignored files: what travels besides .whl)"
echo "limit: 64 MiB per call for the tree, the untracked files that travel and the carried .whl together"

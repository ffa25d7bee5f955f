#!/usr/bin/env bash
# Rehearse scripts/device-check.sh here, on the CPU, as the offline GPU machine runs it: a fresh interpreter that
# sees only the packages of that machine's image (linked from .venv where .venv has them; the rest are absent)
# plus what wheels/ carries, and revive-plugin installed from the tree by device-check.sh itself.
#
#   PY_VERSION=3.11 bash scripts/device-bundle.sh    # wheels/site-py311.tar.xz for .venv's Python 3.11
#   nice -n 19 bash scripts/device-sim.sh            # environment variables go on to device-check.sh
#
# Not rehearsed: CUDA, and the image's own versions (PyTorch, numpy, … are .venv's here). Packages of the image that
# .venv lacks (timm, torchvision, cv2, jax, …) are absent here; on the GPU machine device-check.sh hides the
# multimodal ones (REVIVE_HIDE_MODULES).
set -euo pipefail
cd "$(dirname "$0")/.."
SIM="${SIM:-/tmp/revive-device-sim}"
# The GPU machine image's Python packages (as read there on 2026-11-17).
IMAGE_PACKAGES="
  absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
  charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
  cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
  flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
  huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
  jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
  linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
  mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
  numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
  nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
  nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
  onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
  orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
  propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
  pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
  pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
  sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
  tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
  torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
  typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
base_python=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
rm -rf "$SIM" && mkdir -p "$SIM/image"
"$base_python" -m venv --without-pip "$SIM/venv"
.venv/bin/python - "$SIM/image" $IMAGE_PACKAGES <<'PY'
import importlib.metadata as md, os, re, sys
target, wanted = sys.argv[1], {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2:]}
linked, missing = [], set(wanted)
for dist in md.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name not in wanted:
        continue
    missing.discard(name)
    linked.append(f"{name}=={dist.version}")
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src, dst = dist.locate_file(top), os.path.join(target, top)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
print(f"device-sim: {len(linked)} of the image's {len(wanted)} packages linked from .venv; absent here: "
      f"{' '.join(sorted(missing))}")
PY
site=$("$SIM/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$SIM/image" > "$site/device-image.pth"
# A cache of its own, empty like the GPU machine's: no converted SmolLM2, no statistics.
export REVIVE_CACHE="${REVIVE_CACHE:-$SIM/cache}"
PYTHON="$SIM/venv/bin/python" WORK="$SIM/work" OUT="${OUT:-$SIM/out}" exec bash scripts/device-check.sh

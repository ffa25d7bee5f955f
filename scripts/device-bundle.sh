#!/usr/bin/env bash
# Prepare, here (where PyPI is reachable), what scripts/device-check.sh needs on an offline GPU machine beyond
# that machine's own image (PyTorch, transformers 5.x, pluggy, PyYAML, safetensors, numpy, scipy, pandas, …):
#
#   wheels/site-py3XX.tar.xz   easyeditor 0.0.1.dev0 and the working set it runs with here (transformers 4.57.6,
#                               tokenizers, huggingface_hub < 1, peft, sentence-transformers, datasets, nltk, hydra,
#                               higher, …) as an installed --target tree, xz-compressed; plus smollm2/: the
#                               SmolLM2-135M config and tokenizer (no weights: the 98 MB GGUF cannot travel).
#
# Why one .tar.xz and not the .whl files: the working tree already takes ~48 MiB of the 64 MiB a call carries
# (docs/results holds checkpoints); the wheels are ~19 MiB as zip, the same files solid-xz'd ~9 MiB.
# wheels/ is git-ignored; name the file in the run tool's `carry` list (carry=["wheels/site-py312.tar.xz"]: one
# tarball, not the whole folder if it holds the 3.11 one too). Any *.whl put in wheels/ by hand is installed too
# (pip --no-index --no-deps), after the tarball, so it wins.
#
#   bash scripts/device-bundle.sh                  # for the GPU machine's Python 3.12
#   PY_VERSION=3.11 bash scripts/device-bundle.sh  # for a local rehearsal (scripts/device-sim.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-.venv/bin/python -m pip}"
tag="py${PY_VERSION/./}"
cache="build/device-wheels/$tag"
stage="build/device-bundle/$tag"
out="wheels/site-$tag.tar.xz"

# The versions scripts/install.sh installs here (pyproject's `easyedit` extra resolved on Python 3.11), less
# what the GPU machine's image already has in a version they work with.
BINARY=(
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.17.1 sentence-transformers==5.7.0
  datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0 nltk==3.10.4 omegaconf==2.3.1
  easyeditor==0.0.1.dev0 higher==0.2.1 hydra-core==1.3.8
)
SDIST=(antlr4-python3-runtime==4.9.3)   # published as an sdist only: built into a py3-none-any wheel here
TARGET=(--python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any)

mkdir -p "$cache" wheels
echo "device-bundle: downloading ${#BINARY[@]} wheels for CPython $PY_VERSION (x86-64) into $cache"
$PIP download -q --no-deps --pre --only-binary=:all: "${TARGET[@]}" -d "$cache" "${BINARY[@]}" 2>&1 | { grep -v "is ignored: it is neither" || true; }
for s in "${SDIST[@]}"; do
  name="${s%%==*}"; ls "$cache"/"${name//-/_}"-*.whl >/dev/null 2>&1 || \
    $PIP wheel -q --no-deps --no-build-isolation -w "$cache" "$s" 2>&1 | { grep -v "is ignored: it is neither" || true; }
done

rm -rf "$stage"; mkdir -p "$stage/site" "$stage/smollm2"
$PIP install -q --no-deps --no-index --no-compile --only-binary=:all: "${TARGET[@]}" --target "$stage/site" \
  --find-links "$cache" "${BINARY[@]}" "${SDIST[@]}"
rm -rf "$stage/site/bin"
find "$stage/site" -name __pycache__ -type d -prune -exec rm -rf {} +
printf '%s\n' "${BINARY[@]}" "${SDIST[@]}" > "$stage/site/REVIVE_DEVICE_BUNDLE.txt"

# SmolLM2-135M's config and tokenizer, for a model of its shape with random weights on the GPU machine.
model_dir="$(.venv/bin/python -c 'from revive_plugin.adapters.models import embedded_model_dir; print(embedded_model_dir())')"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$model_dir/$f" "$stage/smollm2/"
done

echo "device-bundle: compressing $(du -sh "$stage" | cut -f1) into $out"
XZ_OPT="${XZ_OPT:--9 -T1}" tar -cJf "$out.partial" -C "$stage" site smollm2
mv "$out.partial" "$out"
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- | tail -1 | cut -f1)
carry_bytes=$(stat -c %s "$out")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "device-bundle: $out $(mib "$carry_bytes"); a call carrying it sends the working tree ($(mib "$tree_bytes")) +" \
     "it = $(mib $((tree_bytes + carry_bytes))) of the 64 MiB allowed"

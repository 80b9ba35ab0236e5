#!/usr/bin/env bash
# Rehearses bench/device.sh here, without a GPU and at no device time, so that a session lent a
# GPU spends its 15 minutes measuring, not finding a missing package. It runs a copy of the
# checkout as the device tool sends one (tracked and untracked-not-ignored files, plus .gpu/; no
# ../shared, no .venv, no generated protobuf modules) with a Python 3.12 venv that holds only
# what the device's image has and tilefm uses (its package list: the device tool's KINDS.md):
# torch 2.11 (PyPI's CUDA build, which runs on CPUs), numpy, onnx, onnxruntime, pytest, ...;
# no Ray. GPU tests skip and the GPU phases (bench-*) need --gpu, so `tests` and `feed` are what
# it can run; they exercise every import and the data paths.
# Usage: bash bench/device-prep.sh; PY312=python3.12 bash bench/device-rehearse.sh [PHASE...]
# (default: tests feed). The venv is kept in $REHEARSE_DIR (default /tmp/tilefm-rehearse).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu/site312.tar.xz ] || { echo "no .gpu/site312.tar.xz: run bash bench/device-prep.sh first" >&2; exit 1; }
[ $# -gt 0 ] || set -- tests feed
work=${REHEARSE_DIR:-/tmp/tilefm-rehearse}
PY312=${PY312:-python3.12}
if [ ! -x "$work/venv/bin/python" ]; then
  "$PY312" -m venv "$work/venv"
  # protobuf below 7: the device's version is not listed, and tilefm's generated modules need 7
  # (they do not travel; nothing the device runs may import them)
  "$work/venv/bin/python" -m pip install -q "torch==2.11.0" numpy onnx onnxruntime safetensors typer rich \
    pyyaml httpx prometheus-client pillow pytest pytest-timeout nvidia-ml-py psutil grpcio "protobuf<7" \
    requests jinja2 click attrs certifi idna six urllib3 python-dateutil typing-extensions packaging \
    pyparsing cloudpickle msgpack
fi
rm -rf "$work/repo" "$work/out" /tmp/site && mkdir -p "$work/repo" "$work/out"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/repo"
cp -r .gpu "$work/repo/"
cd "$work/repo"
PATH="$work/venv/bin:$PATH" OUT="$work/out" FEED_READERS=${FEED_READERS:-2} PRESTO_FEED_READERS=${PRESTO_FEED_READERS:-2} \
  bash bench/device.sh "$@" 2>&1 | tee "$work/out/rehearsal.log"
# the device has a GPU: there the first lines (nvidia-smi, the device's name) succeed
! grep -E "Exception ignored|Error in sys.excepthook|ModuleNotFoundError|ImportError" "$work/out/rehearsal.log" || { echo "rehearsal: errors above" >&2; exit 1; }
grep -q " passed" "$work/out/pytest.log" 2>/dev/null || [[ " $* " != *" tests "* ]] || { echo "rehearsal: no test passed" >&2; exit 1; }
echo "rehearsal: ok ($work/out)"

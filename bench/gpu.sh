#!/usr/bin/env bash
# The GPU benchmarks and tests, on any machine with a CUDA GPU and tilefm installed
# (`pip install -e .` beforehand, with a CUDA build of PyTorch) and the sample data in ../shared.
#
#   bash bench/gpu.sh [PHASE...]      phases: env vit presto feed tests (default: all, in that order)
#
# Phases (each appends its raw rows under OUT as it goes, so a run cut short keeps what it finished):
#   env     the GPU, driver, CPUs and library versions                      -> env.txt
#   vit     bench/encoder.py: vit-base model-only and end to end per variant -> vit.jsonl, vit.md
#   presto  bench/encoder.py: Presto model-only, a 10 m S2 tile's pixels     -> presto.jsonl, presto.md
#   feed    bench/feed.py: the host side alone (instant model), vit-base and Presto -> feed.jsonl
#   tests   pytest -m gpu                                                   -> pytest.log
#   spy     (not in the default list; needs py-spy) the vit-base feed under py-spy, by thread role
#           (bench/spy_summary.py)                                          -> spy.md, spy.txt.gz
#
# Settings (environment variables):
#   OUT             output folder, relative to the repository root (default bench-output/gpu)
#   PYTHON          the interpreter tilefm is installed in (default python3)
#   SHARED          the sample data and models (default ../shared; bench/*.py read ../shared/data)
#   VIT_VARIANTS    default fp32-eager,bf16-compile (also: bf16-graphs)
#   VIT_ZOOM        default 14 (2548 tiles, a 10 m Sentinel-2 tile's size)
#   VIT_BATCH       default 32
#   VIT_E2E_ROUNDS  end-to-end runs per variant in one process (default 2; the row keeps the first)
#   PRESTO_VARIANTS default fp32,bf16
#   FEED_READERS    reader counts for the vit-base feed (default: 3/4 of the cores, as tilefm run takes)
#   FEED_KINDS      default thread,process
#   TESTS_K         a pytest -k expression narrowing the tests
#
# Exit status: 0 when every phase ran, 1 when one failed, 2 when there is no CUDA GPU (nothing run).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench-output/gpu}
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-../shared}
VIT_VARIANTS=${VIT_VARIANTS:-fp32-eager,bf16-compile}
VIT_ZOOM=${VIT_ZOOM:-14}
VIT_BATCH=${VIT_BATCH:-32}
VIT_E2E_ROUNDS=${VIT_E2E_ROUNDS:-2}
PRESTO_VARIANTS=${PRESTO_VARIANTS:-fp32,bf16}
FEED_KINDS=${FEED_KINDS:-thread,process}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is false, or torch is" >&2
  echo "not installed): run it on a machine with a CUDA GPU and a CUDA build of PyTorch." >&2
  exit 2
fi
if ! "$PYTHON" -c "import tilefm" 2>/dev/null; then
  echo "bench/gpu.sh: tilefm is not importable by $PYTHON: run 'pip install -e .' first." >&2
  exit 2
fi
if [ ! -d "$SHARED/data/s2-l2a-29RKH-20200219" ] || [ ! -d "$SHARED/models" ]; then
  echo "bench/gpu.sh: the sample scene and models are not in $SHARED (data/s2-l2a-29RKH-20200219, models/)." >&2
  exit 2
fi
if [ ! -e ../shared ]; then
  echo "bench/gpu.sh: bench/*.py read the scene from ../shared; link it there: ln -s $SHARED ../shared" >&2
  exit 2
fi

export TILEFM_MODEL_STORE=${TILEFM_MODEL_STORE:-$SHARED/models} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cpus=$("$PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))")
FEED_READERS=${FEED_READERS:-$(( cpus * 3 / 4 > 0 ? cpus * 3 / 4 : 1 ))}
[ $# -gt 0 ] || set -- env vit presto feed tests

status=0
run() {  # run a phase's command, note a failure, go on with the next phase
  "$@" || { echo "bench/gpu.sh: failed: $*" >&2; status=1; }
}

for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    env)
      { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
        "$PYTHON" -c "import torch, rasterio; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('rasterio', rasterio.__version__, 'gdal', rasterio.__gdal_version__)"
        echo "cpus $cpus"; lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)|Thread)'; } | tee "$OUT/env.txt" ;;
    vit)
      run "$PYTHON" bench/encoder.py --gpu --models vit-base --backends torch-cuda --variants "$VIT_VARIANTS" \
        --batch-sizes "$VIT_BATCH" --zoom "$VIT_ZOOM" --bbox all --min-tiles 2048 --e2e all \
        --e2e-rounds "$VIT_E2E_ROUNDS" --json-out "$OUT/vit.jsonl" --out "$OUT/vit.md" ;;
    presto)
      run "$PYTHON" bench/encoder.py --gpu --models presto --backends torch-cuda --variants "$PRESTO_VARIANTS" \
        --batch-sizes 16 --zoom 11 --bbox all --min-tiles 256 --presto-pixels 120560400 --e2e best \
        --json-out "$OUT/presto.jsonl" --out "$OUT/presto.md" ;;
    feed)
      run "$PYTHON" bench/feed.py --model vit-base --zoom 13 --readers "$FEED_READERS" --kinds "$FEED_KINDS" \
        --rounds 1 --json-out "$OUT/feed.jsonl"
      run "$PYTHON" bench/feed.py --model presto --zoom 11 --batch 16 --readers 2,4 --kinds "$FEED_KINDS" \
        --rounds 1 --json-out "$OUT/feed.jsonl" ;;
    tests)
      "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m gpu ${TESTS_K:+-k "$TESTS_K"} tests 2>&1 | tee "$OUT/pytest.log" | tail -25
      [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: GPU tests failed (see $OUT/pytest.log)" >&2; status=1; } ;;
    spy)
      if ! command -v py-spy >/dev/null; then echo "bench/gpu.sh: spy needs py-spy on PATH" >&2; status=1; continue; fi
      run py-spy record -r 100 --idle -f raw -o "$OUT/spy.txt" -- "$PYTHON" bench/feed.py --model vit-base \
        --zoom "$VIT_ZOOM" --readers "$FEED_READERS" --kinds process --rounds 1
      run "$PYTHON" bench/spy_summary.py "$OUT/spy.txt" --rate 100 --top 8 > "$OUT/spy.md"
      [ ! -f "$OUT/spy.txt" ] || gzip -f "$OUT/spy.txt" ;;
    *)
      echo "bench/gpu.sh: unknown phase '$phase' (env, vit, presto, feed, tests, spy)" >&2; exit 2 ;;
  esac
done
echo "=== done $(date +%T); rows in $OUT"
exit $status

#!/usr/bin/env bash
# Runs on a lent GPU machine (the `device` tool) over a copy of this checkout: that machine has
# Python 3.12 with CUDA PyTorch but none of tilefm's GDAL stack and no network, so the wheels
# (unpacked, xz) and the sample data travel in the ignored folder .gpu/, which
# `bash bench/device-prep.sh` makes here beforehand (no device time):
#   .gpu/site312.tar.xz            rasterio, pyproj, shapely, rio-tiler, pydantic, ... for cp312
#   .gpu/shared/{data,models}      ../shared's scene and Presto weights
# With the device tool: run(command="bash bench/device.sh bench-vit tests feed", carry=[".gpu"],
# timeout_s=570). The acceptance measurement (ViT-B model-only vs end to end) comes first, so a
# run cut short still brings it back: every phase appends to $OUT as it goes. Rehearsed on a
# CPU-only copy of the device's environment (Python 3.12, torch 2.11, no GDAL stack, no Ray, no
# generated protobuf modules): docs/benchmarks.md, "The device run rehearsed".
# Usage: bash bench/device.sh PHASE... (tests, feed, spy, bench-presto, bench-vit, bench-vit-small); results in $OUT.
# Narrower runs: TESTS_K (pytest -k), FEED_READERS, FEED_KINDS (thread,process), PRESTO_VARIANTS, PRESTO_MIN_TILES, PRESTO_E2E, VIT_VARIANTS, VIT_BATCH, VIT_ZOOM,
# VIT_E2E_ROUNDS (bench-vit's end-to-end runs per variant in one process, default 2: a process's first job pays for fresh memory).
# `spy`: the vit-base feed (zoom VIT_ZOOM, SPY_READERS readers of each of SPY_KINDS) under py-spy, summarised by
# bench/spy_summary.py into $OUT/spy-KIND.md (raw samples gzipped beside it); SPY_SUBPROCESSES=1 samples the reader processes too.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site
for t in .gpu/*.tar.xz; do tar -xJf "$t" -C /tmp/site || exit 1; done
export PYTHONPATH=/tmp/site:$PWD/shared PYTHONUNBUFFERED=1 TILEFM_MODEL_STORE=$PWD/.gpu/shared/models
# the local executor's readers and the COG's threads: tilefm's defaults beside a GPU
# (runtime.local_threads: 12 reader processes and 6 COG threads on 16 cores), unless set here
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,utilization.gpu --format=csv
python3 -c "import torch, rasterio; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'rasterio', rasterio.__version__, 'gdal', rasterio.__gdal_version__)"
nproc
python3 -c "import tilefm.pipeline, tilefm.models.vit_tiles, tilefm.models.presto_tiles, tilefm.localstack, pynvml" || exit 1
for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    tests) python3 -m pytest -q -p no:cacheprovider -rs ${TESTS_K:+-k "$TESTS_K"} tests/test_backends.py tests/test_vit.py tests/test_ray_encoders.py 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
    feed) python3 bench/feed.py --model vit-base --zoom 13 --readers "${FEED_READERS:-4,8,12}" --kinds "${FEED_KINDS:-thread,process}" --rounds 1 --json-out "$OUT/feed.jsonl" 2>&1 | tail -9
          python3 bench/feed.py --model presto --zoom 11 --batch 16 --readers "${PRESTO_FEED_READERS:-2,4}" --kinds "${FEED_KINDS:-thread,process}" --rounds 1 --json-out "$OUT/feed.jsonl" 2>&1 | tail -7 ;;
    spy) [ -x /tmp/spy/bin/py-spy ] || python3 -m pip install -q --no-index --no-deps --target /tmp/spy .gpu/whl/py_spy-*.whl >/dev/null || continue
         for kind in $(echo "${SPY_KINDS:-process}" | tr , ' '); do
           /tmp/spy/bin/py-spy record -r 100 --idle ${SPY_SUBPROCESSES:+--subprocesses} -f raw -o "$OUT/spy-$kind.txt" -- \
             python3 bench/feed.py --model vit-base --zoom "${VIT_ZOOM:-13}" --readers "${SPY_READERS:-12}" --kinds "$kind" --rounds 1 2>&1 | tail -3
           python3 bench/spy_summary.py "$OUT/spy-$kind.txt" --top 8 > "$OUT/spy-$kind.md" && head -30 "$OUT/spy-$kind.md"
           gzip -f "$OUT/spy-$kind.txt"
         done ;;
    bench-vit) python3 bench/encoder.py --gpu --models vit-base --backends torch-cuda --variants "${VIT_VARIANTS:-fp32-eager,bf16-graphs,bf16-compile}" \
        --batch-sizes "${VIT_BATCH:-32}" --zoom "${VIT_ZOOM:-13}" --bbox all --min-tiles 2048 --e2e all --e2e-rounds "${VIT_E2E_ROUNDS:-2}" --json-out "$OUT/vit.jsonl" --out "$OUT/vit.md" 2>&1 | tail -16 ;;
    bench-vit-small) python3 bench/encoder.py --gpu --models vit-small --backends torch-cuda --variants "${VIT_VARIANTS:-fp32-eager,bf16-graphs}" \
        --batch-sizes "${VIT_BATCH:-32}" --zoom "${VIT_ZOOM:-13}" --bbox all --min-tiles 2048 --e2e all --json-out "$OUT/vit-small.jsonl" --out "$OUT/vit-small.md" 2>&1 | tail -12 ;;
    bench-presto) python3 bench/encoder.py --gpu --models presto --backends torch-cuda --variants "${PRESTO_VARIANTS:-fp32,bf16}" --batch-sizes 16 \
        --zoom 11 --bbox all --min-tiles "${PRESTO_MIN_TILES:-256}" --presto-pixels 120560400 --e2e "${PRESTO_E2E:-best}" --json-out "$OUT/presto.jsonl" --out "$OUT/presto.md" 2>&1 | tail -12 ;;
  esac
done
echo "=== done $(date +%T)"

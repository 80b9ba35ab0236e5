#!/usr/bin/env bash
# Prepares .gpu/ for bench/device.sh, here (where PyPI is reachable), before a session's device
# time starts: the lent GPU machine has Python 3.12 with CUDA PyTorch, numpy, onnxruntime, ...
# but none of tilefm's GDAL stack, and no network. Writes (about 50 MB; the device tool carries
# at most 64 MiB with the work tree):
#   .gpu/site312.tar.xz        the wheels it lacks, for cp312 manylinux x86_64, unpacked
#   .gpu/shared/data/s2-...    the sample Sentinel-2 scene (../shared/data)
#   .gpu/shared/models/presto  Presto's weights
#   .gpu/whl/py_spy-*.whl      py-spy, for device.sh's `spy` phase
# Then, with the device tool: run(command="bash bench/device.sh bench-vit tests feed", carry=[".gpu"], timeout_s=570).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# what tilefm imports that the device's image does not hold (its package list: the device
# tool's KINDS.md); their own dependencies come along, less those the image has
want="rasterio rio-tiler rio-cogeo morecantile pyproj shapely affine pydantic pydantic-settings boto3 isal pystac cachetools numexpr color-operations"
have="numpy torch attrs click certifi idna six urllib3 python-dateutil pyyaml typing-extensions packaging pyparsing httpx httpcore anyio h11 sniffio jinja2 markupsafe requests charset-normalizer protobuf filelock fsspec sympy mpmath networkx triton setuptools"
# the versions CI runs (the project's .venv, from `make install`), so that the device measures
# the libraries the tests passed on and its numbers compare with the development machine's;
# PIN=latest takes the newest the registry has (rasterio 1.5 / GDAL 3.12 on Python 3.12)
pins=()
if [ "${PIN:-venv}" = venv ] && [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' | grep -v -i -E '^(torch|tilefm)==' > "$work/pins.txt"
  pins=(-c "$work/pins.txt")
  echo "pinned to .venv: $(grep -i -E '^(rasterio|rio-tiler|pyproj)==' "$work/pins.txt" | tr '\n' ' ')"
fi
"$PY" -m pip download -q "${pins[@]}" --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$work/wheels" $want
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
mkdir -p "$work/site"
for w in "$work"/wheels/*.whl; do
  name=$(norm "$(basename "$w" | cut -d- -f1)")
  skip=0
  for h in $have; do [ "$name" = "$(norm "$h")" ] && skip=1; done
  if [ $skip = 1 ]; then continue; fi
  "$PY" -m zipfile -e "$w" "$work/site"
done
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
# botocore's models of every AWS service (28 MB, already gzipped): S3's and its sign-in's are enough
find "$work/site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +
find "$work/site" -type d \( -name tests -o -name test \) -prune -exec rm -rf {} +
rm -rf .gpu && mkdir -p .gpu/shared/models
tar -C "$work/site" -cJf .gpu/site312.tar.xz .
mkdir -p .gpu/shared/data && cp -r "$SHARED/data/s2-l2a-29RKH-20200219" .gpu/shared/data/
cp -r "$SHARED/models/presto" .gpu/shared/models/presto
# py-spy (a static binary in a wheel, ~3 MB) for device.sh's `spy` phase
mkdir -p .gpu/whl && "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .gpu/whl py-spy==0.4.3
ls "$work/site" | grep -v dist-info | tr '\n' ' '; echo
du -sh .gpu .gpu/site312.tar.xz

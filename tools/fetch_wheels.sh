#!/usr/bin/env bash
# The wheels tools/gpu_check.sh carries to the lent GPU image (Python 3.12, x86-64, no index there), written to
# tools/wheels (ignored by git; name it in the device call's `carry`):
#
#   tools/fetch_wheels.sh [DIR]
#
# jqlora's core imports without omegaconf, datasets, bitsandbytes and tensorboardX, so the check itself needs none of
# them. Only the PyTorch reference (transformers + bitsandbytes + peft, in tools/bench.py) needs one: bitsandbytes,
# 40.9 MB, fetched with --no-deps (its requirements torch, numpy and packaging are on the image; resolving them here
# would pull GBs of CUDA torch). The version is pinned, so the folder is the same on every run. Fails above 64 MiB
# (the device call's carry limit).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-tools/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "bitsandbytes==0.50.0"
bytes=$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f1)
ls -l "$DIR"/*.whl
echo "fetch_wheels: $(ls "$DIR"/*.whl | wc -l) wheel(s), $((bytes / 1048576)) MiB in $DIR"
if (( bytes > 64 * 1048576 )); then
    echo "fetch_wheels: over the 64 MiB a device call carries" >&2
    exit 1
fi

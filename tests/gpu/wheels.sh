#!/usr/bin/env bash
# The wheels tests/gpu/check.py needs on a bare GPU image (Python 3.12 with torch, accelerate, peft, pyarrow and
# tokenizers, as the device machines have; /work/.library/device/README.md): the pinned TRL, datasets (and its dill,
# multiprocess), transformers and Liger's kernels, about 15 MB. flash-attn has no PyPI wheel: the check uses sdpa.
#
#   tests/gpu/wheels.sh download          # here, with PyPI: into .whl/ (add /.whl/ to .git/info/exclude)
#   tests/gpu/wheels.sh check [ARGS...]   # there: install .whl/ into /tmp/site when present, run the check
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(trl==1.16.0 datasets==5.2.0 transformers==5.19.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)

case "${1:-}" in
  download)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}" ;;
  check)
    shift
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
    PYTHONUNBUFFERED=1 exec python3 tests/gpu/check.py "$@" ;;
  *)
    echo "usage: tests/gpu/wheels.sh download | check [check.py arguments]" >&2
    exit 2 ;;
esac

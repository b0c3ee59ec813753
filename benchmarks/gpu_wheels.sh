#!/usr/bin/env bash
# Fetch into .whl/ the Python 3.12 x86-64 wheels the GPU machine lacks (it has torch, numpy, pandas, pyarrow,
# fsspec, scipy, timm, einops, pytest, ...; not zarr, numcodecs, webdataset, dynamic-network-architectures,
# monai, nibabel, nilearn). SimpleITK (the converter's, ~50 MB) stays behind: nothing on the GPU path needs it. Run here, then carry .whl to the device; benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() { .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "$@"; }
fetch "zarr==$(.venv/bin/python -c 'import zarr; print(zarr.__version__)')" \
  "numcodecs==$(.venv/bin/python -c 'import numcodecs; print(numcodecs.__version__)')" \
  "donfig" "crc32c" "google-crc32c" "webdataset==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("webdataset"))')" \
  "braceexpand" "nibabel" "nilearn" "monai==$(.venv/bin/python -c 'import monai; print(monai.__version__)')" "typing_extensions"
# dynamic-network-architectures ships only a source archive: build its pure-Python wheel here
.venv/bin/python -m pip wheel -q --no-deps -w .whl \
  "dynamic-network-architectures==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("dynamic-network-architectures"))')"
du -sh .whl && ls .whl

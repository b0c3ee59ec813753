#!/usr/bin/env bash
# One command for a new machine: create .venv (CPU torch unless one is already there), install the
# project with its console scripts (and Debian's headless Chromium for the report's browser tests), then run the
# demo end to end (demo corpus -> convert -> query -> QC report -> train -> probe), then SimCLR and y-aware on the
# same store, probed alike.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q "$@"; }
pip install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU build (a plain `pip install torch` on Linux pulls a multi-GB CUDA build). Local wheels or the
  # configured index first, else PyTorch's CPU index; set TORCH_SPEC (e.g. "torch==2.13.0") on a CUDA machine.
  spec=${TORCH_SPEC:-torch==2.13.0+cpu}
  pip install "$spec" || pip install --index-url https://download.pytorch.org/whl/cpu "$spec"
fi
pip install -e ".[test,bench]" einops
# Debian's headless Chromium and its driver, for the QC report's browser tests (tests/test_report.py, driven by
# selenium): installed once, quietly; without root or apt-get, say what the tests will miss.
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -qq update >/dev/null
    apt-get -qq install -y --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "setup.sh: chromium and chromium-driver are missing; as root: apt-get install chromium chromium-driver" \
      "(tests/test_report.py fails without them)" >&2
  fi
fi
# dynamic-network-architectures after the project and without its dependencies: its timm requirement (only its
# Primus/DINOv2 modules import timm; ResEnc never does) pulls torchvision and with it a multi-GB CUDA torch.
pip install --no-deps "dynamic-network-architectures>=0.4.4,<0.5"  # the range nnunetv2 2.8.1 accepts
# The [finetune] extra (released nnU-Net; the tests fine-tune with it) alike: nnunetv2 with --no-deps, then its own
# requirements but torch and dynamic-network-architectures, which are here already (~7 s, ~100 MB).
requirements() {  # of installed distribution $1 (its extra $2, else its base) but torch and DNA, as NAME+SPEC words
  .venv/bin/python - "$@" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

def wanted(r, extra):
    base = r.marker is None or r.marker.evaluate({"extra": ""})
    return (not base and r.marker.evaluate({"extra": extra})) if extra else base

reqs = [r for r in map(Requirement, requires(sys.argv[1]) or []) if wanted(r, sys.argv[2] if len(sys.argv) > 2 else "")]
print(*(f"{r.name}{r.specifier}" for r in reqs if r.name not in ("torch", "dynamic-network-architectures")))
EOF
}
# shellcheck disable=SC2046  # one requirement per word
pip install --no-deps $(requirements openmind-tools finetune)
# shellcheck disable=SC2046
pip install $(requirements nnunetv2)
# pip check must pass but for that one known, unused requirement
broken=$(.venv/bin/python -m pip check 2>&1 | grep -v -e "^dynamic-network-architectures .* requires timm" \
  -e "^No broken requirements found" || true)
if [ -n "$broken" ]; then echo "setup.sh: pip check failed:"; echo "$broken"; exit 1; fi
[ "${1:-}" = "--no-demo" ] && exit 0

demo=${DEMO_DIR:-demo}
.venv/bin/openmind-convert demo-data "$demo/corpus"
rm -rf "$demo/store"  # the demo store is rebuilt each time: a store of an older converter would be refused
.venv/bin/openmind-convert "$demo/corpus" "$demo/store" --format zarr,wds --workers 2
.venv/bin/openmind-manifest stats "$demo/store/manifest.parquet"
.venv/bin/openmind-manifest query "$demo/store/manifest.parquet" --preset mae8 -o "$demo/mae8.parquet"
.venv/bin/openmind-manifest report "$demo/store/manifest.parquet" -o "$demo/report" --workers 2 --quiet
m="$demo/store/manifest.parquet"
.venv/bin/openmind-train training/configs/demo.toml --overwrite --run.out="\"$demo/run\"" \
  --stages.voco.manifest="\"$m\"" --stages.mae.manifest="\"$m\""
.venv/bin/openmind-train training/configs/demo_yaware.toml --overwrite --run.out="\"$demo/run_contrastive\"" \
  --stages.simclr.manifest="\"$m\"" --stages.yaware.manifest="\"$m\""
# did they learn anything? linear probes vs a random-init encoder and a trivial baseline
for export in run/voco run/mae run_contrastive/simclr run_contrastive/yaware; do
  .venv/bin/openmind-eval probe "$demo/${export}_encoder.pt" --manifest "$m" --target modality,sex,age --no-progress
done
echo "demo outputs are under $demo/"

#!/usr/bin/env bash
# Does pretraining help? The README's cohort tables, end to end on a CPU machine (about 3.5 h on 2 cores):
# the synthetic cohort -> its store at 2 mm -> MAE, VoCo, y-aware from fresh encoders -> linear probes of age,
# brain and lesion volume -> few-shot segmentation (MAE vs scratch) and age-group classification (y-aware
# vs scratch). Every number it prints is a measurement of this run; nothing is tuned to make a method win.
#   bash benchmarks/cohort_gain.sh [OUT]   (default cohort/; corpus, store, raw dataset and pretraining are skipped where OUT holds them)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-cohort}
bin=.venv/bin
[ -f "$out/corpus/openneuro_metadata.csv" ] || $bin/openmind-convert demo-data "$out/corpus" --cohort 120 --quiet
[ -f "$out/store/manifest.parquet" ] || $bin/openmind-convert "$out/corpus" "$out/store" --spacing 2 --format zarr \
  --workers 2 --quiet
[ -d "$out/nnunet_raw" ] || $bin/openmind-convert nnunet-dataset "$out/corpus" "$out/nnunet_raw"
m="$out/store/manifest.parquet"
if [ ! -f "$out/run/yaware_final.pt" ]; then
  resume=(); [ -f "$out/run/checkpoint.pt" ] && resume=(--resume "$out/run")
  $bin/openmind-train training/configs/cohort.toml "${resume[@]}" --run.out="\"$out/run\"" \
    --stages.mae.manifest="\"$m\"" --stages.voco.manifest="\"$m\"" --stages.yaware.manifest="\"$m\""
fi
for stage in mae voco yaware; do  # encoder-only for VoCo and y-aware, with the stage's 2 mm spacing in the plan
  $bin/openmind-train export "$out/run" --stage "$stage" -o "$out/$stage.pt"
done
t1="modality=T1w of $m"
for stage in mae voco yaware; do
  $bin/openmind-eval probe "$out/$stage.pt" --manifest "$t1" --target age,brain_volume,lesion_volume,sex \
    --patch-size 64 -o "$out/probe_$stage" --no-progress || [ $? -eq 3 ]
done
$bin/openmind-eval finetune "$out/mae.pt" --dataset "$out"/nnunet_raw/Dataset501_OpenMindCohort --shots 4,20 \
  --seeds 3 --steps 250 -o "$out/finetune_seg"
$bin/openmind-eval finetune "$out/yaware.pt" --manifest "$t1" --target age --bins 55 --shots 4,20 \
  --seeds 2 --folds 3 --steps 100 -o "$out/finetune_age"
# The longer budget: 4x the steps, 3 seeds (about 3.5 h on 2 cores)
$bin/openmind-eval finetune "$out/mae.pt" --dataset "$out"/nnunet_raw/Dataset501_OpenMindCohort --shots 20,4 \
  --seeds 3 --steps 1000 -o "$out/finetune_seg_1000"

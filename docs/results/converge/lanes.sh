#!/bin/bash
# Issue 41 item 3: the finalists for 30 epochs with the test scored after every epoch as a curve
# (train.test_curve), 3 seeds each, two runs at a time on the 2 cores (as the studies' parallel_runs
# 2), each with the config.yaml of its 10-epoch cell in the study (docs/results/fusion).
# Usage, from the repository root: docs/results/converge/lanes.sh STUDY TABLES OUT
STUDY=$1; TABLES=$2; OUT=$3
lane() {  # a cell of the study
  for seed in 0 1 2; do
    run=$OUT/runs/$1/seed$seed
    [ -f $run/result.json ] && continue
    .venv/bin/dec-ray train --tables $TABLES --out $run --config $STUDY/runs/$1/seed0/config.yaml \
      --set train.epochs=30 --set train.test_curve=true --set train.seed=$seed > $OUT/$1_seed$seed.log 2>&1
  done
}
lane deepemocluster_pool0_k10_lambda1_ssl-preset_labels0.25 &
lane cnn_preset-egemaps_labels0.25 &
wait

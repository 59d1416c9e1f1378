#!/bin/bash
# Train a run's grid over N nodes and render its report when every slice is done:
#   WORK=/shared/repro-work slurm/submit-grid.sh params/mimic-iv.yaml 4 [/data/mimic-iv-meds]
# N array tasks (one GPU each; GRES="" on a CPU-only cluster) each train a disjoint slice of the runs of
# notebooks 01, 03 and 05 into $WORK (repro train --shard i/N: whole backbone x seed groups, stage locks);
# a job depending on all of them runs `repro run --work $WORK`. Prepare the data once first (repro prepare
# PARAMS on any node with the same checkout), or let the first tasks tokenize it. Prints both job ids.
# ENV_NAME: a conda environment to activate in the jobs (else `repro` must be on PATH). Extra sbatch
# options (partition, account, time) go in SBATCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PARAMS=${1:?usage: WORK=DIR slurm/submit-grid.sh PARAMS N [DATA]}
N=${2:?usage: WORK=DIR slurm/submit-grid.sh PARAMS N [DATA]}
: "${WORK:?set WORK to a folder every node sees}"
export PARAMS WORK DATA=${3:-${DATA:-}} NAME=${NAME:-$(basename "$PARAMS" .yaml)}
GRES=${GRES---gres=gpu:1}
# shellcheck disable=SC2086 # GRES and SBATCH_ARGS are lists of options
train=$(sbatch --parsable --array=0-$((N - 1)) $GRES ${SBATCH_ARGS:-} slurm/train-array.sbatch)
# shellcheck disable=SC2086
report=$(sbatch --parsable --dependency=afterok:"$train" $GRES ${SBATCH_ARGS:-} slurm/report-after.sbatch)
echo "$train $report"

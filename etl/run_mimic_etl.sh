#!/usr/bin/env bash
# Convert raw MIMIC-IV-shaped tables to MEDS with the MIMIC_IV_MEDS ETL (PyPI mimic-iv-meds 0.2.0).
#
#   etl/run_mimic_etl.sh RAW_DIR OUT_DIR
#   etl/run_mimic_etl.sh --install        (only create the ETL's venv)
#
# RAW_DIR is what repro.data.mimic_raw.write_mimic_raw wrote (our synthetic cohort as MIMIC-IV tables);
# the spec is etl/mimic_iv_meds_subset.yaml, the packaged event config trimmed to those tables. The ETL
# lives in its own venv (.venv-etl in the project root, created on first use) because its pins (polars,
# MEDS-transforms 0.7) are not ours. Then: repro run params/smoke.yaml --data OUT_DIR/ --name ...
#
# For REAL MIMIC-IV (credentialed PhysioNet download) use the full packaged spec instead:
#
#   .venv-etl/bin/meds-extract-run spec=MIMIC-IV output_dir=/path/to/MEDS do_download=false \
#       input_dir=/path/to/physionet.org/files/mimiciv/3.1
#
# input_dir is the release folder itself (hosp/*.csv.gz and icu/*.csv.gz, as PhysioNet lays it out),
# and it must also hold, at its top level, the mimic-code v2.4.0 concept maps
# (mimic-iv/concepts/concept_map/*.csv): the spec reads d_labitems_to_loinc, meas_chartevents_main,
# proc_datetimeevents, proc_itemid, inputevents_to_rxnorm and outputevents_to_loinc, and the download
# step fetches four more (lab_itemid_to_loinc, meas_chartevents_value, numerics-summary,
# waveforms-summary). Every table the spec names must exist. Without do_download=false, the ETL
# downloads all of it itself (needs DATASET_DOWNLOAD_USERNAME / DATASET_DOWNLOAD_PASSWORD).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-etl"
PYTHON="${PYTHON:-python3}"
install_etl() {
  if [[ ! -x "$VENV/bin/meds-extract-run" ]]; then
    echo "creating $VENV with mimic-iv-meds==0.2.0 (once)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "mimic-iv-meds==0.2.0"
  fi
}
if [[ "${1:-}" == "--install" ]]; then  # make etl-venv: just the ETL's own environment
  install_etl
  exit 0
fi
if [[ $# -ne 2 ]]; then
  echo "usage: $0 RAW_DIR OUT_DIR   (RAW_DIR from repro.data.mimic_raw.write_mimic_raw; OUT_DIR must not exist)" >&2
  exit 2
fi
RAW="$(cd "$1" && pwd)"
OUT="$2"
SPEC="$ROOT/etl/mimic_iv_meds_subset.yaml"

if [[ -e "$OUT" ]]; then
  echo "$0: $OUT exists; remove it or choose another directory" >&2
  exit 2
fi
install_etl

start_ms=$(($(date +%s%N) / 1000000))
# The ETL's stages are separate console scripts (MEDS_transform-stage), so its venv must be on PATH.
PATH="$VENV/bin:$PATH" meds-extract-run spec="$SPEC" output_dir="$OUT" do_download=false input_dir="$RAW"
ms=$(($(date +%s%N) / 1000000 - start_ms))
printf 'MIMIC_IV_MEDS ETL: %s -> %s in %d.%03d s\n' "$RAW" "$OUT" $((ms / 1000)) $((ms % 1000))

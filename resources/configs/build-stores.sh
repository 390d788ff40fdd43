#!/usr/bin/env bash
# Patch stores the bundled model trains on (run from the repository root; DATA = ../shared/data).
# Patients A and B (HER2ST B4, A1) are never read here: they are the held-out test sections.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-stores}
CAPTIONS=resources/configs/slide-captions.csv
# VALIDATE=C6 builds the validation twins (stores/her2st-C-val, stores/he-val) without that
# section, for resources/configs/mupd-tiny-val.yaml and `mupd eval --validate C6`.
VALIDATE=${VALIDATE:-}
SECTIONS=(); for s in C2:0.686 C3:0.687 C4:0.687 C5:0.686 C6:0.687; do
  [ "${s%%:*}" = "$VALIDATE" ] || SECTIONS+=("$s"); done
SUFFIX=${VALIDATE:+-val}
# 1. HER2ST patient C spot tiles: RNA, derived captions, marker maps (RNA->H&E, H&E->marker)
mupd data her2st --root "$DATA" --sections "${SECTIONS[@]%%:*}" --out "$OUT/her2st-C$SUFFIX" --overwrite
# 2. H&E tiles from all usable slides: the VAE and unconditional / text generation.
#    TCGA-CR-7395 has no mpp tag: 1.0 um/px is estimated (lymphocyte nuclei ~6-7 px wide).
#    HER2ST images: mpp measured from each section's spot grid (stores/her2st-C manifest).
mupd data slide "$DATA/wsi/CMU-1-Small-Region.svs" --patient CMU --captions $CAPTIONS \
  --out "$OUT/he${SUFFIX:--all}" --overwrite
mupd data slide "$DATA/wsi/TCGA-CR-7395-01A-01-TS1.svs" --patient TCGA-CR-7395 --slide-mpp 1.0 \
  --captions $CAPTIONS --out "$OUT/he${SUFFIX:--all}" --append
for s in "${SECTIONS[@]}"; do
  mupd data slide "$DATA/st/her2st/images/${s%%:*}_HE.jpg" --patient C --slide-mpp "${s##*:}" \
    --captions $CAPTIONS --out "$OUT/he${SUFFIX:--all}" --append
done

#!/bin/sh
# The training step of `docker compose up` (docker-compose.yml runs it in the lesion-train image).
# Trains on $DATA_DIR if it holds HAM10000_metadata.csv, else on synthetic demo data, with
# $LESION_PRESET (default: cpu for real data, smoke for the demo), into a run folder of its own per
# data and preset under $RUNS_DIR, then points $RUNS_DIR/current at it (what the API serves). So a
# change of data or preset starts a new run instead of failing on the old one's settings, and
# running it again resumes or skips the finished run. `docker compose down -v` deletes every run.
set -eu
RUNS_DIR=${RUNS_DIR:-/runs}
DATA_DIR=${DATA_DIR:-/data}
if [ -f "$DATA_DIR/HAM10000_metadata.csv" ]; then
  DATA=$DATA_DIR
  PRESET=${LESION_PRESET:-cpu}
  KEY=data-$(sha256sum "$DATA_DIR/HAM10000_metadata.csv" | cut -c1-12)
else
  DATA=$RUNS_DIR/demo-data
  [ -f "$DATA/HAM10000_metadata.csv" ] || python -m training demo-data --out "$DATA"
  PRESET=${LESION_PRESET:-smoke}
  KEY=demo
fi
RUN=$RUNS_DIR/$KEY-$PRESET
echo "training on $DATA with the $PRESET preset into $RUN"
python -m training run --data-dir "$DATA" --out "$RUN" --preset "$PRESET"
if [ -d "$RUNS_DIR/current" ] && [ ! -L "$RUNS_DIR/current" ]; then  # a run folder of an older compose file
  mv "$RUNS_DIR/current" "$RUNS_DIR/previous-$(date +%Y%m%dT%H%M%S)"
fi
ln -sfn "$KEY-$PRESET" "$RUNS_DIR/current.new"
mv -T "$RUNS_DIR/current.new" "$RUNS_DIR/current"
echo "serving $RUN (RUNS_DIR/current)"

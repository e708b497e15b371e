#!/bin/bash
# Issue #7's GPU measurements in ONE device call. Prepare here, once (the folder is git-ignored):
#
#   mkdir -p .device && cp -r ../shared/anchors ../shared/data .device/
#
# then, with a card:  run(command="bash tools/device_check.sh", carry=[".device"], timeout_s=570)
# Plumbing dry run on the CPU (no card, tiny settings, ~3 min):  DRY=1 bash tools/device_check.sh
#
# Output: every line goes to stdout and to $OUT/device_check.log; one JSON line per hw2.py run to
# $OUT/runs.jsonl; the per-question summary (the figures BENCHMARKS.md needs) to $OUT/summary.txt.
#
# Budget, seconds of device time (whole processes, data prep included). Inputs: airbench94 ~4 s
# and airbench96 ~35 s per run on an A100 (published); hw2 full 41 s whole process on an H200
# (BENCHMARKS.md, of which ~10 s are Problems 1-3, start-up and the first epoch's autotuning);
# fast ~1/4 of full's FLOPs (Muon, tuned on the CPU); torch.compile ~40-60 s of compiling per process.
#   phase        what                                                        estimate
#   data         JPEG -> batches -> the 45k/5k split (side_by_side.sh)             30
#   baseline     side_by_side.sh: airbench94 x3, airbench96 x2, hw2 full x2       190
#   fast         hw2 fast x3 seeds (Muon), + seed 0 with --optimizer sgd           90
#   fullalt      full x2 seeds with the other widths at the same FLOPs (FULL_ALT_ARGS) 90
#   determinism  fast seed 0 again (default kernels), fast --deterministic x2      70
#   compile      fast --compile, full --compile (compile time included)           150
#   fullsgd      full seed 0 as the SGD recipe (128/512/512, SGD, 30 epochs)        45
#   total                                                                        ~665
# A phase starts only if its estimate fits before DEADLINE (default 500 s after the start), in the
# order above, so a slow card still returns the most important figures first (at these estimates
# compile and fullsgd are skipped: 30+190+90+90+70 = 470 s leaves no room before 500). Run with
# timeout_s=570, then at once, while the card is warm, PHASES="compile fullsgd" for the rest.
# Knobs: PHASES ("baseline fast fullalt determinism compile fullsgd"), DEADLINE, AB94_RUNS, AB96_RUNS,
# FULL_RUNS, FAST_RUNS, FAST_ARGS, FULL_ARGS (extra hw2.py flags, e.g. to try other epochs),
# FULL_ALT_ARGS, FULL_SGD_ARGS, PY, W.
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$(date +%s)
DRY=${DRY:-0}
OUT=${OUT:-/tmp/device_check_out}
W=${W:-/tmp/side_by_side}
mkdir -p "$OUT" "$W/runs"
exec > >(tee -a "$OUT/device_check.log") 2>&1
if [ "$DRY" = 1 ]; then  # the CPU: every phase's plumbing, nothing worth timing
  PY=${PY:-.venv/bin/python}; export SKIP_ANCHORS=1
  FULL_ARGS=${FULL_ARGS:---preset smoke --epochs 2}; FAST_ARGS=${FAST_ARGS:---preset smoke --epochs 1 --optimizer muon}
  FULL_RUNS=${FULL_RUNS:-1}; FAST_RUNS=${FAST_RUNS:-2}; FULL_SGD_ARGS=${FULL_SGD_ARGS:---optimizer sgd --epochs 3}
  FULL_ALT_ARGS=${FULL_ALT_ARGS:---widths 8,16,32 --epochs 1}
else
  PY=${PY:-python3}
  FULL_ARGS=${FULL_ARGS:---preset full}; FAST_ARGS=${FAST_ARGS:---preset fast}
  FULL_SGD_ARGS=${FULL_SGD_ARGS:---widths 128,512,512 --optimizer sgd --epochs 30}  # the recipe before Muon (0.934 on an H200)
  FULL_ALT_ARGS=${FULL_ALT_ARGS:---widths 128,384,512 --epochs 35}  # airbench96's widths, same FLOPs (proxy: level)
fi
PHASES=${PHASES:-baseline fast fullalt determinism compile fullsgd}
DEADLINE=${DEADLINE:-500}
ANCHORS=.device/anchors
[ -f "$ANCHORS/side_by_side.sh" ] || { echo "device_check: $ANCHORS missing: mkdir -p .device && cp -r ../shared/anchors ../shared/data .device/"; exit 2; }

elapsed() { echo $(( $(date +%s) - T_START )); }
fits() {  # fits WHAT ESTIMATE_S: true if it can still finish before the deadline
  if [ $(( $(elapsed) + $2 )) -gt "$DEADLINE" ]; then
    echo "== $1: SKIPPED at $(elapsed) s (needs ~$2 s, deadline $DEADLINE s)"; return 1
  fi
  echo "== $1 (estimate $2 s) starting at $(elapsed) s"
}
phase() {  # phase NAME ESTIMATE_S: asked for in PHASES, and it fits
  if [[ " $PHASES " != *" $1 "* ]]; then echo "== $1: not asked for"; return 1; fi
  fits "$1" "$2"
}
hw2_run() {  # hw2_run NAME FLAGS...: one whole hw2.py process on the split, one JSON line
  local name=$1; shift
  local o="$W/runs/$name"; rm -rf "$o"
  local t0; t0=$(date +%s.%N)
  if ! "$PY" hw2.py "$@" --data-dir "$W/split" --val-size 0 --output-dir "$o" >"$o.log" 2>&1; then
    echo "RUN $name FAILED ($*):"; tail -3 "$o.log"
    echo "{\"name\": \"$name\", \"failed\": true}" >>"$OUT/runs.jsonl"; return 1
  fi
  "$PY" tools/device_summary.py run "$name" "$o/metrics.json" "$t0" "$(date +%s.%N)" "$*" >>"$OUT/runs.jsonl"
  tail -1 "$OUT/runs.jsonl" | "$PY" tools/device_summary.py line
}

echo "device_check | $(date -u +%FT%TZ) | DRY=$DRY | PHASES=$PHASES | deadline $DEADLINE s"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
if [ "$DRY" = 1 ] && [ -d /tmp/cifar/cifar-10-batches-py ] && [ ! -e "$W/full" ]; then
  ln -s /tmp/cifar "$W/full"  # reuse the batches built earlier on this machine
fi

# data + baseline: the given harness, unchanged (its data prep runs even when the phase is skipped)
if phase baseline 220; then
  W="$W" PY="$PY" AB94_RUNS=${AB94_RUNS:-3} AB96_RUNS=${AB96_RUNS:-2} HW2_RUNS=${FULL_RUNS:-2} \
    HW2_ARGS="$FULL_ARGS" bash "$ANCHORS/side_by_side.sh"
  for s in $(seq 0 $(( ${FULL_RUNS:-2} - 1 ))); do  # the harness's runs, in our JSON too
    [ -f "$W/hw2_$s/metrics.json" ] && "$PY" tools/device_summary.py run "full_s$s" "$W/hw2_$s/metrics.json" 0 0 \
      "$FULL_ARGS --seed $s" >>"$OUT/runs.jsonl"
  done
else
  W="$W" PY="$PY" SKIP_ANCHORS=1 HW2_RUNS=0 bash "$ANCHORS/side_by_side.sh"  # data prep only
fi

if phase fast 90; then
  for s in $(seq 0 $(( ${FAST_RUNS:-3} - 1 ))); do hw2_run "fast_s$s" $FAST_ARGS --seed "$s"; done
  hw2_run fast_s0_sgd $FAST_ARGS --seed 0 --optimizer sgd  # Muon's worth (accuracy, time) on the card
fi

if phase fullalt 90; then  # the widths were chosen on a CPU proxy: the other choice beside them
  for s in $(seq 0 $(( ${FULL_RUNS:-2} - 1 ))); do hw2_run "fullalt_s$s" $FULL_ARGS --seed "$s" $FULL_ALT_ARGS; done
fi

if phase determinism 70; then  # same seed, same card: byte-identical submission.csv?
  [ -f "$W/runs/fast_s0/submission.csv" ] || hw2_run fast_s0 $FAST_ARGS --seed 0
  hw2_run fast_s0_again $FAST_ARGS --seed 0
  hw2_run fast_s0_det $FAST_ARGS --seed 0 --deterministic
  hw2_run fast_s0_det_again $FAST_ARGS --seed 0 --deterministic
fi

if phase compile 50; then
  hw2_run fast_s0_compile $FAST_ARGS --seed 0 --compile
  if fits "compile (full)" 100; then hw2_run full_s0_compile $FULL_ARGS --seed 0 --compile; fi
fi

if phase fullsgd 45; then  # full's SGD recipe before Muon, for the record
  hw2_run full_s0_sgd $FULL_ARGS --seed 0 $FULL_SGD_ARGS
fi

"$PY" tools/device_summary.py summary "$OUT/runs.jsonl" "$OUT/device_check.log" >"$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "device_check done in $(elapsed) s"

#!/bin/bash
# Issue #7's GPU measurements in ONE device call. Prepare here, once (the folder is git-ignored):
#
#   mkdir -p .device && cp -r ../shared/anchors ../shared/data .device/
#
# then, with a card:  run(command="DEADLINE=555 bash tools/device_check.sh", carry=[".device"], timeout_s=590)
# Plumbing dry run on the CPU (no card, tiny settings, ~2 min):  DRY=1 bash tools/device_check.sh
#
# Output: every line goes to stdout and to $OUT/device_check.log; one JSON line per hw2.py run to
# $OUT/runs.jsonl; the per-question summary (the figures BENCHMARKS.md needs) to $OUT/summary.txt;
# the pool, pooltune, profile and tune phases' lines also to $OUT/pool.txt, pooltune.txt,
# profile.txt and tune.txt.
#
# Budget, seconds of device time (whole processes, data prep included), from the first calls on
# an H200 (2026-11-28, BENCHMARKS.md): data prep 26 s; airbench94 2.2 s and airbench96 ~17 s per
# run in their own process; hw2 fast 18-23 s per whole process, of which ~14 s were start-up and
# Problems 1-3 (these runs pass --skip-answers: ~7 s less, a guess); hw2 full ~38 s (29 s of
# training in an earlier H200 run); torch.compile ~40-60 s of compiling per process (a guess; it
# compiles twice per run: the stem's bias freezing after epoch 3 recompiles, tests/test_recipe.py).
#   phase        what (in the order they run)                                     estimate
#   data         JPEG -> batches -> the 45k/5k split (side_by_side.sh)                  30
#   preflight    hw2 fast, 1 epoch: stops the call if hw2.py fails or misses the GPU    25
#   pool         tools/pool_bench.py: 2x2 max-pool candidates, their kernels alone      20
#   pooltune     the candidates that passed pool's rule (POOL verdict ... pass), in fast
#                end to end against PyTorch's pool: warm time and accuracy on hw2's own
#                split (tools/warm_runs.py --variant pool=NAME); none passed: nothing
#                                                         10 + 13 per variant (36 for one)
#   baseline     side_by_side.sh: airbench94 x3, airbench96 x3, hw2 full x3            170
#   fast         hw2 fast x3 seeds, each with --prewarm off (the default) and on, in fresh
#                processes, the order alternating by seed (device_summary's rule decides
#                --prewarm's default; fast_sN are item 3's sample)                       105
#   tune         full's variants (TUNE_VARIANTS) x TUNE_SEEDS on hw2's own split of the
#                50k in one process (tools/warm_runs.py: a warm run costs half a process;
#                each run's weights also scored with the clean BatchNorm recount)       190
#   profile      fast under torch.profiler: a fresh process's first epoch and prediction
#                (--cold: where the one-off seconds go), then warm epochs by kernel kind  35
#   determinism  fast seed 0 again (default settings), fast seed 0 --deterministic       25
#   compile      fast --compile, full --compile (compile time included)               100
#   graph        full seed 0 with --cuda-graph off (the graph's worth to full)           25
#   fullalt      full x2 seeds with the other widths at the same FLOPs (FULL_ALT_ARGS)  76
#   autotune     fast and full seed 0 with --autotune on (measured 2026-11-29: off)      45
#   sgdbf16      fast seed 0 with --optimizer sgd and in bf16 (measured 2026-11-29)      25
#   fullsgd      full seed 0 as the SGD recipe (128/512/512, SGD, 30 epochs)            38
#   (fast's epochs were a phase of fresh processes, fastepochs, until 2026-11-30; they are a
#   tune run now, the one way of tuning: PHASES=tune TUNE_PRESET=fast TUNE_VARIANTS='|epochs=8';
#   read its paired gain and warm time: the tune rule's 1.08x time test was written for full's
#   26 -> 28 epochs, and 7 -> 8 costs ~1.12x (one more warm epoch, ~0.29 s of 2.35 s), so its
#   verdict there is KEEP by construction)
#   default PHASES: preflight pool pooltune baseline fast tune (what #7 still lacks), with the
#   data step: ~540 when no pool candidate passes, ~575 when one does (then the last phase,
#   tune, does not fit and is skipped); profile (35) no longer fits and runs when named
#   (the fresh processes' train-time split, in the summary, sizes the one-off costs first)
# (an H200: 2026-11-29's list ran in 508 s; 2026-11-30's list (preflight baseline fast
# determinism compile fastepochs graph profile) in 544 s; those phases run when named in PHASES,
# but fastepochs, retired since, stops the script as an unknown phase)
# A phase starts only if its estimate fits before DEADLINE (default 500 s after the start), in the
# order they appear below (the phases measured and decided earlier only when named in PHASES),
# so a slow card still returns the most important figures first. With a
# 15-minute lease (a minute or two of it the machine's start), run with DEADLINE=555 and
# timeout_s=590 (the default list fits); if phases were skipped, then at once, while the card is
# warm (it goes back after 30 s idle), e.g. PHASES="graph profile" DEADLINE=100 with what is left.
# Knobs: PHASES (default "preflight pool pooltune baseline fast tune"), DEADLINE, TUNE_VARIANTS
# (variants separated by "|", each space-separated key=value overrides; "" the preset), TUNE_SEEDS,
# TUNE_PRESET, TUNE_ARGS (extra warm_runs.py flags), OWN_VAL (own split's held-out images), POOL_ARGS,
# POOL_CANDIDATES (space-separated; default those pool passed), POOLTUNE_PRESET, POOLTUNE_SEEDS, POOLTUNE_ARGS,
# AB94_RUNS, AB96_RUNS, FULL_RUNS, FAST_RUNS, FAST_ARGS, FULL_ARGS (extra hw2.py flags, e.g. to
# try other epochs), FULL_ALT_ARGS, FULL_SGD_ARGS, PROFILE_PRESET, PROFILE_ARGS, PY, W.
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$(date +%s)
DRY=${DRY:-0}
PHASES=${PHASES:-preflight pool pooltune baseline fast tune}
KNOWN_PHASES="preflight pool pooltune profile tune baseline fast determinism compile graph fullalt autotune sgdbf16 fullsgd"
for p in $PHASES; do  # a misspelt phase would be skipped in silence, and the card's minutes
  # with it: stop before anything is written or removed
  [[ " $KNOWN_PHASES " == *" $p "* ]] || { echo "device_check: unknown phase '$p' in PHASES (known: $KNOWN_PHASES)"; exit 2; }
done
OUT=${OUT:-/tmp/device_check_out}
W=${W:-/tmp/side_by_side}
mkdir -p "$OUT" "$W/runs"
# the rules read these: never an earlier call's (runs.jsonl and the log do add up over calls)
rm -f "$OUT/pool.txt" "$OUT/pooltune.txt" "$OUT/pooltune.json" "$OUT/tune.txt" "$OUT/tune.json"
exec > >(tee -a "$OUT/device_check.log") 2>&1
if [ "$DRY" = 1 ]; then  # the CPU: every phase's plumbing, nothing worth timing
  PY=${PY:-.venv/bin/python}; export SKIP_ANCHORS=1
  FULL_ARGS=${FULL_ARGS:---preset smoke --epochs 2 --skip-answers}; FAST_ARGS=${FAST_ARGS:---preset smoke --epochs 1 --optimizer muon --skip-answers}
  FULL_RUNS=${FULL_RUNS:-1}; FAST_RUNS=${FAST_RUNS:-2}; FULL_SGD_ARGS=${FULL_SGD_ARGS:---optimizer sgd --epochs 3}
  FULL_ALT_ARGS=${FULL_ALT_ARGS:---widths 8,16,32 --epochs 1}
  PROFILE_PRESET=${PROFILE_PRESET:-smoke}; PROFILE_ARGS=${PROFILE_ARGS:---n-train 2048}; OWN_VAL=${OWN_VAL:-100}
  TUNE_PRESET=${TUNE_PRESET:-smoke}; TUNE_ARGS=${TUNE_ARGS:---n-train 512 --epochs 1}; TUNE_SEEDS=${TUNE_SEEDS:-0,1}
  # no candidate saves time on a CPU: a threshold that every one passes, so that pooltune runs
  TUNE_VARIANTS=${TUNE_VARIANTS-|lr=20.0}; POOL_ARGS=${POOL_ARGS:---iters 2 --batch 16 --min-save-ms=-1e9}
  POOLTUNE_PRESET=${POOLTUNE_PRESET:-smoke}; POOLTUNE_ARGS=${POOLTUNE_ARGS:---n-train 512 --epochs 1}
  POOLTUNE_SEEDS=${POOLTUNE_SEEDS:-0,0,1}
else
  PY=${PY:-python3}
  # --skip-answers: Problems 1-3 (~7-10 s a process) are the same in every run; skipped, the
  # whole lease gains ~100 s. The criterion is train + predict, which they are not part of.
  FULL_ARGS=${FULL_ARGS:---preset full --skip-answers}; FAST_ARGS=${FAST_ARGS:---preset fast --skip-answers}
  FULL_SGD_ARGS=${FULL_SGD_ARGS:---widths 128,512,512 --optimizer sgd --epochs 30}  # the recipe before Muon (0.934 on an H200)
  FULL_ALT_ARGS=${FULL_ALT_ARGS:---widths 128,384,512 --epochs 35}  # airbench96's widths, same FLOPs (proxy: level)
  PROFILE_PRESET=${PROFILE_PRESET:-fast}; PROFILE_ARGS=${PROFILE_ARGS:---cold}  # --cold: a fresh process's one-off costs too
fi
# full's candidates, on our own split (rule, BENCHMARKS.md "What the next card measures"): the
# preset, Muon's step at the top of the CPU proxy's flat range, two more epochs (1.08x the time)
TUNE_VARIANTS=${TUNE_VARIANTS-|muon_lr=0.11|epochs=28}; TUNE_SEEDS=${TUNE_SEEDS:-0,1,2,3}  # "": the preset alone
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
  HW2_RAN=1
}

echo "device_check | $(date -u +%FT%TZ) | DRY=$DRY | PHASES=$PHASES | deadline $DEADLINE s"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
if [ "$DRY" = 1 ] && [ -d /tmp/cifar/cifar-10-batches-py ] && [ ! -e "$W/full" ]; then
  ln -s /tmp/cifar "$W/full"  # reuse the batches built earlier on this machine
fi

# data first (the harness's own prep, no runs), then one short hw2.py run: a card-only failure
# (a kernel, an API of this torch) stops the call here with its traceback, not 10 minutes later
W="$W" PY="$PY" SKIP_ANCHORS=1 HW2_RUNS=0 bash "$ANCHORS/side_by_side.sh"
if phase preflight 25; then
  # with Problems 1-3 (no --skip-answers): Problem 3's profiler is what once broke the GPU probe
  if ! hw2_run preflight ${FAST_ARGS//--skip-answers/} --seed 0 --epochs 1; then
    tail -40 "$W/runs/preflight.log"; echo "device_check: preflight failed, stopping"; exit 3
  fi
  # a run that quietly fell back to the CPU (it happened: a failed CUDA probe) would spend the
  # whole lease training `quick` on the host's cores
  if [ "$DRY" != 1 ] && ! grep -q '"device": "cuda"' "$W/runs/preflight/metrics.json"; then
    grep -n -i "note\|error\|cuda" "$W/runs/preflight.log" | tail -20
    echo "device_check: preflight ran on the CPU, not the GPU: stopping"; exit 3
  fi
  # Muon's step from a CUDA graph: recorded and replayed, or fell back to eager (a note says why)
  grep -o '"cuda_graph": [a-z]*' "$W/runs/preflight/metrics.json"; grep "hw2: note: Muon" "$W/runs/preflight.log"
fi

if phase pool 20; then  # is a cheaper 2x2 max-pool there? kernels alone, before hw2.py changes
  "$PY" tools/pool_bench.py ${POOL_ARGS:-} 2>&1 | tee "$OUT/pool.txt"
fi

# a candidate that passed pool's rule, end to end in fast (rule, BENCHMARKS.md, "max-pool candidates
# end to end"): its warm train + predict median no slower than PyTorch's pool's in the same process,
# and its mean accuracy, paired over the seeds, no more than 0.2 % below (device_summary's rules)
if [ -z "${POOL_CANDIDATES+set}" ] && [ -f "$OUT/pool.txt" ]; then
  POOL_CANDIDATES=$("$PY" tools/device_summary.py passed "$OUT")  # the rules' own reading of pool.txt
fi
POOL_CANDIDATES=${POOL_CANDIDATES:-}
if [[ " $PHASES " == *" pooltune "* ]] && [ -z "${POOL_CANDIDATES// /}" ]; then
  echo "== pooltune: no pool candidate passed (or pool did not run): nothing to price"
elif phase pooltune $(( 10 + 13 * ($(wc -w <<<"$POOL_CANDIDATES") + 1) )); then  # ~2.5 s a warm run
  _pargs=(--variant ""); for c in $POOL_CANDIDATES; do _pargs+=(--variant "pool=$c"); done
  "$PY" tools/warm_runs.py --preset "${POOLTUNE_PRESET:-fast}" --data-dir "$W/full" --val-size "${OWN_VAL:-5000}" \
    --seeds "${POOLTUNE_SEEDS:-0,0,1,2,3}" ${POOLTUNE_ARGS:-} "${_pargs[@]}" --json "$OUT/pooltune.json" 2>&1 | grep -E "^WARM|^warm_runs:|rror" \
    | tee "$OUT/pooltune.txt"
fi

# data + baseline: the given harness, unchanged (its data prep runs even when the phase is skipped)
if phase baseline 170; then
  W="$W" PY="$PY" AB94_RUNS=${AB94_RUNS:-3} AB96_RUNS=${AB96_RUNS:-3} HW2_RUNS=${FULL_RUNS:-3} \
    HW2_ARGS="$FULL_ARGS" bash "$ANCHORS/side_by_side.sh"
  HW2_RAN=1
  for s in $(seq 0 $(( ${FULL_RUNS:-3} - 1 ))); do  # the harness's runs, in our JSON too
    [ -f "$W/hw2_$s/metrics.json" ] && "$PY" tools/device_summary.py run "full_s$s" "$W/hw2_$s/metrics.json" 0 0 \
      "$FULL_ARGS --seed $s" >>"$OUT/runs.jsonl"
  done
fi

if phase fast 105; then  # item 3's fresh processes, and --prewarm's pairs (device_summary's rule)
  # the call's first hw2 process pays one-off costs (page cache, the driver's first load: a first
  # epoch of 4.7 s against 1.5 s once): never inside a pair (with PHASES="fast" alone, say)
  [ "${HW2_RAN:-0}" = 1 ] || hw2_run fast_first $FAST_ARGS --seed 0 --epochs 1
  for s in $(seq 0 $(( ${FAST_RUNS:-3} - 1 ))); do  # off first on even seeds, on first on odd: a drift
    # over the call falls on both arms (with 3 seeds, a third of one step's drift remains); each
    # arm says its setting, so a changed default or an HW2_PREWARM in the environment can't blur them
    if (( s % 2 )); then
      hw2_run "fast_s${s}_prewarm" $FAST_ARGS --seed "$s" --prewarm on; hw2_run "fast_s$s" $FAST_ARGS --seed "$s" --prewarm off
    else
      hw2_run "fast_s$s" $FAST_ARGS --seed "$s" --prewarm off; hw2_run "fast_s${s}_prewarm" $FAST_ARGS --seed "$s" --prewarm on
    fi
  done
fi

if phase tune 190; then  # full's variants on hw2's own split of the 50k (never the harness's split)
  IFS='|' read -r -a _variants <<<"$TUNE_VARIANTS"
  _vargs=(); for v in "${_variants[@]}"; do _vargs+=(--variant "$v"); done
  [ "${TUNE_VARIANTS: -1}" = "|" ] && _vargs+=(--variant "")  # read drops a trailing empty field
  [ ${#_vargs[@]} -eq 0 ] && _vargs=(--variant "")  # TUNE_VARIANTS="": the preset alone
  "$PY" tools/warm_runs.py --preset "${TUNE_PRESET:-full}" --data-dir "$W/full" --val-size "${OWN_VAL:-5000}" \
    --seeds "$TUNE_SEEDS" ${TUNE_ARGS:-} "${_vargs[@]}" --json "$OUT/tune.json" 2>&1 | grep -E "^WARM|^warm_runs:|rror" | tee "$OUT/tune.txt"
fi

if phase profile 35; then  # a cold process's one-off costs, and where a warm epoch's GPU time goes
  "$PY" tools/step_profile.py --preset "$PROFILE_PRESET" --data-dir "$W/split" $PROFILE_ARGS 2>&1 \
    | grep -v -E "^(USDT|ERROR|WARNING):" | tee "$OUT/profile.txt"
fi

if phase determinism 25; then  # same seed, same card: byte-identical submission.csv?
  [ -f "$W/runs/fast_s0/submission.csv" ] || hw2_run fast_s0 $FAST_ARGS --seed 0
  hw2_run fast_s0_again $FAST_ARGS --seed 0
  hw2_run fast_s0_det $FAST_ARGS --seed 0 --deterministic  # its cost, and the same bytes as the default?
fi

if phase compile 100; then
  hw2_run fast_s0_compile $FAST_ARGS --seed 0 --compile
  if fits "compile (full)" 60; then hw2_run full_s0_compile $FULL_ARGS --seed 0 --compile; fi
fi

if phase graph 25; then  # full's Muon step op by op, against the harness's full_s0
  hw2_run full_s0_nograph $FULL_ARGS --seed 0 --cuda-graph off
fi

if phase fullalt 76; then  # the widths were chosen on a CPU proxy: the other choice beside them
  for s in $(seq 0 $(( ${FULL_RUNS:-2} - 1 ))); do hw2_run "fullalt_s$s" $FULL_ARGS --seed "$s" $FULL_ALT_ARGS; done
fi

# measured on 2026-11-29 and decided; kept for a new card or a new torch
if phase autotune 45; then
  hw2_run fast_s0_at $FAST_ARGS --seed 0 --autotune on
  if fits "autotune (full)" 35; then hw2_run full_s0_at $FULL_ARGS --seed 0 --autotune on; fi
fi

if phase sgdbf16 25; then  # Muon's worth, and bf16 (no GradScaler) against fp16
  hw2_run fast_s0_sgd $FAST_ARGS --seed 0 --optimizer sgd
  hw2_run fast_s0_bf16 $FAST_ARGS --seed 0 --precision bf16
fi

if phase fullsgd 38; then  # full's SGD recipe before Muon, for the record
  hw2_run full_s0_sgd $FULL_ARGS --seed 0 $FULL_SGD_ARGS
fi

"$PY" tools/device_summary.py summary "$OUT/runs.jsonl" "$OUT/device_check.log" >"$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "device_check done in $(elapsed) s"

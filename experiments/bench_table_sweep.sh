#!/usr/bin/env bash
# The GPU bench table: every bench model and default sampler x {svdquant_w4a4, svdquant_w3a4, mixdq_w4a8}
# x corrector=all (FP, quantized, every Q-Drift rule and peer), 2,000 prompts per variant, per replicate.
#
#   experiments/bench_table_sweep.sh OUT_ROOT [PART[:QUANT,...] ...]   PART: dit unet flow_euler flow_dpmpp
#   python experiments/bench_table.py --deltas OUT_ROOT > bench_table.md
#
# Each part and replicate is one Hydra multirun, so its quantizers share the FP images through the
# cache (PART:QUANT,... runs only those quantizers). These jobs are queued round-robin on
# JOBS_PER_GPU (1) slots per visible GPU, each slot working through its queue: the bench models
# leave an H200 mostly idle, so several processes share one. CPU threads are split between the slots.
# Resumable: run it again with the same OUT_ROOT; finished jobs are skipped and finished stages come from
# the cache.
# PYTHON, PROMPTS (2000), BATCH (250), REPLICATES (0,1,2), CORRECTORS (all, or a Hydra list such as
# [qdrift_plus,ptqd]), JOBS_PER_GPU and DEADLINE (seconds since the epoch: jobs still running then are
# stopped, their finished stages cached) can be set.
set -uo pipefail
root=${1:?usage: $0 OUT_ROOT [PART[:QUANT,...] ...]}
shift
(( $# )) || set -- dit unet flow_euler flow_dpmpp
declare -A choice=([dit]="model=bench_dit" [unet]="model=bench_unet"
                   [flow_euler]="model=bench_flow sampler=flow_euler" [flow_dpmpp]="model=bench_flow sampler=dpmpp")
for p in "$@"; do
  [[ -n ${choice[${p%%:*}]:-} ]] || { echo "error: unknown part '${p%%:*}' (dit unet flow_euler flow_dpmpp)" >&2; exit 2; }
  [[ $p != *: ]] || { echo "error: '$p' names no quantizer after the colon (e.g. ${p}svdquant_w3a4)" >&2; exit 2; }
done
py=${PYTHON:-python}
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
(( ngpu > 0 )) || { echo "error: no GPU visible" >&2; exit 2; }
per_gpu=${JOBS_PER_GPU:-1}
[[ $per_gpu =~ ^[0-9]+$ ]] && (( per_gpu >= 1 )) || { echo "error: JOBS_PER_GPU must be an integer >= 1, got '$per_gpu'" >&2; exit 2; }
deadline=${DEADLINE:-$(( $(date +%s) + 7 * 86400 ))}
[[ $deadline =~ ^[0-9]+$ ]] || { echo "error: DEADLINE is seconds since the epoch (date +%s), got '$deadline'" >&2; exit 2; }
(( deadline > $(date +%s) )) || { echo "error: DEADLINE $deadline ($(date -d "@$deadline")) is already past" >&2; exit 2; }
reps_arg=${REPLICATES:-0,1,2}
[[ $reps_arg =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: REPLICATES is a comma-separated list of integers, got '$reps_arg'" >&2; exit 2; }
mapfile -t reps < <(tr , '\n' <<< "$reps_arg" | awk '!seen[$0 + 0]++ { print $0 + 0 }')   # each replicate once
correctors=${CORRECTORS:-all}   # one option, or a Hydra list: a bare a,b would sweep one job per corrector
[[ $correctors =~ ^[a-z0-9_]+$ || $correctors =~ ^\[[a-z0-9_]+(,[a-z0-9_]+)*\]$ ]] || {
  echo "error: CORRECTORS is one corrector option or a list [a,b,...], got '$correctors'" >&2; exit 2; }
slots=$(( ngpu * per_gpu ))
threads=$(( $(nproc) / slots > 0 ? $(nproc) / slots : 1 ))
mkdir -p "$root"

# finished SWEEP_DIR QUANT: a job of that sweep with this quantizer, correctors and prompts has its results
# (whatever its batch size: no number depends on it).
finished() {
  local o
  for o in "$1"/*/.hydra/overrides.yaml; do
    [[ -f ${o%/.hydra/overrides.yaml}/metrics.json ]] && grep -qxF -- "- quant=$2" "$o" \
      && grep -qxF -- "- corrector=$correctors" "$o" && grep -qxF -- "- eval.num_prompts=${PROMPTS:-2000}" "$o" && return 0
  done
  return 1
}

run_job() {   # run_job GPU PART[:QUANTS] REPLICATE
  local part=${2%%:*} quants=svdquant_w4a4,svdquant_w3a4,mixdq_w4a8 left=$(( deadline - $(date +%s) )) q todo=()
  [[ $2 == *:* ]] && quants=${2#*:}
  # A resumed sweep runs only the quantizers not finished yet: a finished job's directory is never reused.
  for q in ${quants//,/ }; do finished "$root/$part/multirun_r$3" "$q" || todo+=("$q"); done
  (( ${#todo[@]} )) || { echo "done: $part replicate $3 ($quants) has its results"; return 0; }
  quants=$(IFS=,; echo "${todo[*]}")
  (( left > 10 )) || { echo "skip $part replicate $3: deadline" >&2; return 1; }
  echo "gpu $1: $part replicate $3 ($quants)"
  # shellcheck disable=SC2086  # the choice holds several overrides
  # --foreground: run.py stays in this script's process group (Ctrl-C reaches it); -k: killed if it ignores TERM.
  CUDA_VISIBLE_DEVICES=$1 OMP_NUM_THREADS=$threads timeout --foreground -k 60 "$left" $py run.py -m ${choice[$part]} \
    quant="$quants" replicate="$3" corrector="$correctors" eval.num_prompts="${PROMPTS:-2000}" batch_size="${BATCH:-250}" \
    device=cuda logger=none output_root="$root/$part" hydra.sweep.dir="$root/$part/multirun_r$3" \
    >> "$root/${part}_r$3.log" 2>&1 \
    || { echo "error: $part replicate $3 failed or was stopped; see $root/${part}_r$3.log" >&2; return 1; }
}

# Part-major order with slot k on GPU k mod ngpu: a part's replicates alternate between GPUs, so a heavy
# part is not all on one GPU, and every GPU has a slot before any has two.
jobs=()
for p in "$@"; do for r in "${reps[@]}"; do jobs+=("$p $r"); done; done
pids=()
# Stopping the sweep stops its runs: each slot's timeout passes the signal on to its run.py.
trap 'trap - INT TERM; for p in "${pids[@]}"; do pkill -TERM -P "$p"; done; kill "${pids[@]}" 2> /dev/null' INT TERM
for (( k = 0; k < slots; k++ )); do
  ( status=0
    for (( i = k; i < ${#jobs[@]}; i += slots )); do
      read -r part rep <<< "${jobs[$i]}"
      run_job $(( k % ngpu )) "$part" "$rep" || status=1
    done
    exit $status ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "table: $py experiments/bench_table.py --deltas $root"
exit $status

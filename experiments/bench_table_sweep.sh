#!/usr/bin/env bash
# The GPU bench table: every bench model and default sampler x {svdquant_w4a4, svdquant_w3a4, mixdq_w4a8}
# x corrector=all (FP, quantized, Q-Drift paper/exact, PTQD, D^2-DPM), 2,000 prompts per variant.
#
#   experiments/bench_table_sweep.sh OUT_ROOT [PART[:QUANT,...] ...]   PART: dit unet flow_euler flow_dpmpp
#   python experiments/bench_table.py OUT_ROOT > bench_table.md
#
# Each part is one Hydra multirun, so its quantizers share the FP images through the cache
# (PART:QUANT,... runs only those quantizers). Parts are queued round-robin on the visible GPUs,
# each GPU working through its queue; CPU threads are split between the GPUs' processes.
# PYTHON, PROMPTS (2000) and BATCH (250) can be set.
set -uo pipefail
root=${1:?usage: $0 OUT_ROOT [PART[:QUANT,...] ...]}
shift
(( $# )) || set -- dit unet flow_euler flow_dpmpp
declare -A choice=([dit]="model=bench_dit" [unet]="model=bench_unet"
                   [flow_euler]="model=bench_flow sampler=flow_euler" [flow_dpmpp]="model=bench_flow sampler=dpmpp")
for p in "$@"; do
  [[ -n ${choice[${p%%:*}]:-} ]] || { echo "error: unknown part '${p%%:*}' (dit unet flow_euler flow_dpmpp)" >&2; exit 2; }
done
py=${PYTHON:-python}
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
(( ngpu > 0 )) || { echo "error: no GPU visible" >&2; exit 2; }
threads=$(( $(nproc) / ngpu > 0 ? $(nproc) / ngpu : 1 ))
mkdir -p "$root"

run_part() {   # run_part GPU PART[:QUANTS]
  local part=${2%%:*} quants=svdquant_w4a4,svdquant_w3a4,mixdq_w4a8
  [[ $2 == *:* ]] && quants=${2#*:}
  echo "gpu $1: $part ($quants)"
  # shellcheck disable=SC2086  # the choice holds several overrides
  CUDA_VISIBLE_DEVICES=$1 OMP_NUM_THREADS=$threads $py run.py -m ${choice[$part]} quant="$quants" \
    corrector=all eval.num_prompts="${PROMPTS:-2000}" batch_size="${BATCH:-250}" device=cuda logger=none \
    output_root="$root/$part" hydra.sweep.dir="$root/$part/multirun" >> "$root/$part.log" 2>&1 \
    || { echo "error: $part failed; see $root/$part.log" >&2; return 1; }
}

parts=("$@")
pids=()
for (( g = 0; g < ngpu; g++ )); do
  ( status=0
    for (( i = g; i < ${#parts[@]}; i += ngpu )); do run_part "$g" "${parts[$i]}" || status=1; done
    exit $status ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "table: $py experiments/bench_table.py $root"
exit $status

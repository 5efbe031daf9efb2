#!/usr/bin/env bash
# The paper's settings at real size with random weights (model.source=random): the whole runner at the
# paper's resolution and steps on one GPU, then Q-Drift's per-step overhead on the same architecture.
#
#   experiments/bench_real_size.sh OUT GPU PROMPTS SETTING [SETTING ...]
#   python experiments/real_size_table.py OUT [SCALE_OUT_JSON] > real_size.md
#
# SETTING is a conf/experiment name without "paper_" (pixart_svdquant_w3a4, flux_schnell_svdquant_w3a4,
# sdxl_turbo_mixdq_w4a8, ...). Settings run one after another on GPU (CUDA_VISIBLE_DEVICES); start one
# such queue per GPU. DEADLINE (seconds since the epoch) stops a queue before a time limit; DEVICE
# (default cuda) and EXTRA (more run.py overrides) allow a CPU check at reduced size:
#   DEVICE=cpu EXTRA="model.arch_size=reduced model.svdquant_rank=4 model.resolution=64 cuda_graph=false" ...
#
# The PTQ searches are cut down (one calibration prompt, alpha grid 2, one low-rank pass, 256 tokens;
# MixDQ: one sensitivity prompt): random weights make their result meaningless, and at paper settings
# they take hours on FLUX. Sampling, calibration (K = 5) and evaluation run as a user's run does.
set -uo pipefail
out=${1:?usage: $0 OUT GPU PROMPTS SETTING...}; gpu=${2:?GPU}; prompts=${3:?PROMPTS}; shift 3
py=${PYTHON:-python}
deadline=${DEADLINE:-$(( $(date +%s) + 86400 ))}
mkdir -p "$out"
for setting in "$@"; do
  left=$(( deadline - $(date +%s) ))
  (( left > 30 )) || { echo "skip $setting: deadline" | tee -a "$out/real_size.log"; continue; }
  model=${setting%%_svdquant*}; model=${model%%_mixdq*}
  case $setting in
    *svdquant*) light="quant.calib_prompts=1 quant.alpha_grid=2 quant.lowrank_iters=1 quant.calib_tokens=256" ;;
    *mixdq*)    light="quant.calib_prompts=1 quant.sensitivity_prompts=1" ;;
  esac
  batch=4; [[ $model == sdxl_turbo ]] && batch=8
  echo "gpu $gpu: $setting" | tee -a "$out/real_size.log"
  # shellcheck disable=SC2086  # $light holds several overrides
  CUDA_VISIBLE_DEVICES=$gpu timeout "$left" $py run.py experiment="paper_$setting" model.source=random \
    eval=bench eval.num_prompts="$prompts" batch_size=$batch calib.num_runs=5 calib.batch_size=5 $light \
    cuda_graph=true device="${DEVICE:-cuda}" logger=none output_root="$out/$setting" ${EXTRA:-} >> "$out/$setting.log" 2>&1 \
    || echo "error: $setting failed or timed out; see $setting.log" | tee -a "$out/real_size.log"
  left=$(( deadline - $(date +%s) ))
  (( left > 30 )) || continue
  steps=$($py -c "import yaml,sys; print(yaml.safe_load(open('conf/model/$model.yaml'))['steps'])")
  CUDA_VISIBLE_DEVICES=$gpu timeout "$left" $py experiments/bench_drift_overhead.py --model "$model" \
    --set model.source=random --steps "$steps" --batch 1 --repeats 3 --json "$out/$setting.overhead.json" \
    --device "${DEVICE:-cuda}" $(for o in ${EXTRA:-}; do [[ $o == model.* ]] && printf -- '--set %s ' "$o"; done) \
    >> "$out/$setting.log" 2>&1 || echo "error: $setting overhead failed" | tee -a "$out/real_size.log"
done

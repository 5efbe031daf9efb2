# Runner check on one H200 of the per-step schedules: the embedded default's setting on 1,000 tune-pool
# prompts with Q-Drift+, qdrift_plus_sched set to Q-Drift+'s own values with equal ends (must give the same
# images), and a ramped variant. Returns metrics.json and the printed table.
C=$PWD/.gpu_carry; T0=$(date +%s)
mkdir -p /tmp/src /tmp/site && tar cf - --exclude=.gpu_carry . | tar xf - -C /tmp/src && tar xzf $C/pkgs.tar.gz -C /tmp/site && tar xzf $C/pkgs2.tar.gz -C /tmp/site
cd /tmp/src
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:/tmp/src
nvidia-smi --query-gpu=name --format=csv,noheader
S=corrector.qdrift_plus_sched
timeout 250 python run.py 'corrector=[qdrift_plus,qdrift_plus_sched]' eval.pool=tune eval.num_prompts=1000 batch_size=250 device=cuda logger=none \
  $S.drift_scale=0.85 $S.drift_scale_end=0.85 $S.mean_removal=0.65 $S.mean_removal_end=0.65 $S.infeasible=shrink \
  '+corrector.ramp={kind:qdrift,mode:exact,infeasible:shrink,pooling:channel,drift_scale:0.6,drift_scale_end:1.2,mean_removal:0.8,mean_removal_end:0.4}' \
  output_root=/tmp/o hydra.run.dir=/tmp/o/run 2>&1 | tail -n 9
cp /tmp/o/run/metrics.json $OUT/ 2>/dev/null
python - <<'PY'
import hashlib, pathlib
d = pathlib.Path("/tmp/o/run/images")
h = lambda v: hashlib.sha256(b"".join(p.read_bytes() for p in sorted((d / v).glob("*.png"), key=lambda p: int(p.stem)))).hexdigest()[:16]
print({v: h(v) for v in ("qdrift_plus", "qdrift_plus_sched", "ramp")})
PY
echo "elapsed $(( $(date +%s) - T0 )) s"

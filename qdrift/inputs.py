"""The files a run will read, checked before any model loads: weights, prompt sets, enough prompts.

Each check asks the module that later reads the input (model loaders, eval weights, prompt sets),
so the message is the one the reader would give, only before the hours of sampling instead of after.
"""
from __future__ import annotations

from .config import ConfigError, calib_runs, map_runs, one_line, quant_calib_prompts
from .models.loaders import ModelUnavailable, check_available
from .prompts import PromptSetUnavailable, eval_start, prompt_set


def check_inputs(cfg) -> None:
    try:
        check_available(cfg.model)
    except ModelUnavailable as err:
        raise ConfigError(one_line(err)) from None
    _check_eval_weights(cfg.eval)
    _check_prompts(cfg)


def _check_eval_weights(e) -> None:
    from .eval.clip_score import clip_weights
    from .eval.features import inception_weights
    from .eval.paired import lpips_weights

    try:
        if e.features == "inception":
            inception_weights(e.get("inception_weights"))
        if e.clip == "openclip":
            clip_weights(e.clip_arch, e.get("clip_pretrained"), e.get("clip_weights"))
        if e.get("lpips_weights") is not None:   # unset: LPIPS is skipped with a warning
            lpips_weights(e.lpips_weights)
    except FileNotFoundError as err:
        raise ConfigError(one_line(err)) from None
    if e.clip == "bench" or e.features == "clip":
        from .bench import WEIGHTS_DIR, weights_available

        if not weights_available():
            raise ConfigError(f"eval.clip=bench / eval.features=clip need the bench evaluation CLIP, but the bench "
                              f"weights in {WEIGHTS_DIR} are incomplete; reinstall qdrift")


def _check_prompts(cfg) -> None:
    e = cfg.eval
    try:
        source = prompt_set(e)
    except PromptSetUnavailable as err:
        raise ConfigError(one_line(err)) from None
    n = int(e.num_prompts)
    runs = max(calib_runs(cfg), map_runs(cfg)) if cfg.corrector else 0
    ptq = quant_calib_prompts(cfg.quant)
    need = max(runs, ptq)
    what = f"the {source.name} prompt set"
    start = eval_start(e)
    if source.max_eval is not None and n > source.max_eval:
        raise ConfigError(f"eval.num_prompts={n} is more than the {source.max_eval} evaluation prompts of {what}")
    if source.max_eval is not None and start + n > source.max_eval:
        more = " (or raise eval.eval_split)" if source.name == "mjhq" else ""
        raise ConfigError(f"eval.split={e.get('split', 0)} evaluates prompts [{start}, {start + n}) (split * "
                          f"eval.num_prompts onwards), but {what} has {source.max_eval} evaluation prompts: it holds "
                          f"{source.max_eval // n} disjoint splits of {n}; lower eval.split or eval.num_prompts{more}")
    if source.max_calib is not None and need > source.max_calib:
        uses = ([f"Q-Drift: {calib_runs(cfg)} = calib.num_runs={cfg.calib.num_runs} in whole batches of "
                 f"calib.batch_size={cfg.calib.batch_size}"] if runs else []) + (
                [f"the mean error map: mean_map_runs={map_runs(cfg)}"] if map_runs(cfg) else []) + (
                [f"PTQ: {ptq} = quant.calib_prompts"] if ptq else [])
        raise ConfigError(f"this run needs {need} calibration prompts ({'; '.join(uses)}) but {what} has "
                          f"{source.max_calib} outside its evaluation split")
    calib = set(source.calib_prompts(runs) if runs else []) | set(
        source.calib_prompts(ptq, seed=int(cfg.quant.seed)) if ptq else [])   # PTQ draws with quant.seed
    overlap = set(source.eval_prompts(n)) & calib
    if overlap:
        raise ConfigError(f"{len(overlap)} calibration prompts of {what} are also evaluation prompts, e.g. "
                          f"{sorted(overlap)[0]!r}: lower eval.num_prompts, calib.num_runs or quant.calib_prompts")
    if e.reference == "directory":
        missing = [i for i in range(n) if not source.reference_path(i).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} of {n} MJHQ reference images are missing, e.g. "
                              f"{source.reference_path(missing[0])}: eval.mjhq_dir needs MJHQ's <category>/<id>.jpg "
                              "folders (unzip mjhq30k_imgs.zip there)")

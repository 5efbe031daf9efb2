"""Build the bench models from their configs, export them, and assemble diffusers pipelines offline.

`load_bench_pipeline("bench_dit")` returns a stock PixArtSigmaPipeline (bench_unet: StableDiffusionPipeline,
bench_flow: FluxPipeline) built from the shipped safetensors: the same classes, quantizers and
scheduler wrappers as the real models see.
"""
from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ..models.families import denoiser_of
from ..models.tokenizers import word_level_tokenizer
from . import configs
from .grammar import MAX_TOKENS, vocabulary
from .weights import (
    TOKENIZER_FILE,
    BenchWeightsError,
    load_model_file,
    regenerate_hint,
    save_model_file,
)
from .weights import weights_dir as resolve_dir

_TRANSFORMERS = {"T5EncoderModel": (T5EncoderModel, T5Config), "CLIPTextModel": (CLIPTextModel, CLIPTextConfig)}
_ENCODER_CLASS = {"t5": "T5EncoderModel", "clip_text": "CLIPTextModel"}
_DENOISER_CLASS = {"bench_dit": "PixArtTransformer2DModel", "bench_unet": "UNet2DConditionModel",
                   "bench_flow": "FluxTransformer2DModel"}


# ---- tokenizer ----

def bench_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the caption grammar's vocabulary (what training builds and saves)."""
    return word_level_tokenizer(vocabulary(), MAX_TOKENS)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(path))
    return path


def load_tokenizer(directory: str | Path | None = None, max_length: int = MAX_TOKENS) -> PreTrainedTokenizerFast:
    path = resolve_dir(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise BenchWeightsError(f"bench tokenizer {path} is missing; {regenerate_hint(TOKENIZER_FILE)}")
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<bos>", eos_token="<eos>", model_max_length=max_length,
                                       padding_side="right")
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise BenchWeightsError(f"bench tokenizer {path} is corrupted ({err}); "
                                f"{regenerate_hint(TOKENIZER_FILE)}") from err


# ---- modules from (class name, kwargs) specs; the specs travel in the weights file's metadata ----

def spec(cls: str, kwargs: dict) -> dict:
    return {"class": cls, "kwargs": kwargs}


def build(module_spec: dict) -> torch.nn.Module:
    cls, kwargs = module_spec["class"], module_spec["kwargs"]
    if cls in _TRANSFORMERS:
        model_cls, config_cls = _TRANSFORMERS[cls]
        return model_cls(config_cls(**kwargs))
    if cls == "CLIP":
        from .evalclip import build_eval_clip
        return build_eval_clip(kwargs)
    return getattr(diffusers, cls).from_config(kwargs)


def vae_spec(sizes: dict) -> dict:
    return spec("AutoencoderKL", configs.vae_config(sizes["vae"]))


def generator_specs(name: str, sizes: dict) -> dict[str, dict]:
    """Pipeline slot -> module spec for the trainable parts of generator `name`."""
    vocab = len(bench_tokenizer())
    enc_kwargs = {"t5": configs.t5_config(sizes["t5"], vocab),
                  "clip_text": configs.clip_text_config(sizes["clip_text"], vocab)}
    out = {configs.DENOISER[name]: spec(_DENOISER_CLASS[name], configs.denoiser_config(name, sizes))}
    for slot, kind in configs.TEXT_ENCODERS[name].items():
        out[slot] = spec(_ENCODER_CLASS[kind], enc_kwargs[kind])
    return out


def scheduler_spec(name: str) -> dict:
    cls, kwargs = configs.SCHEDULERS[name]
    return spec(cls, kwargs)


def export(path: str | Path, modules: dict[str, torch.nn.Module], specs: dict[str, dict],
           extra: dict | None = None) -> int:
    """One fp16 safetensors file holding `modules` (slot-prefixed) with their specs in the metadata."""
    tensors = {f"{slot}.{k}": v for slot, m in modules.items() for k, v in m.state_dict().items()}
    return save_model_file(path, tensors, {"modules": specs, **(extra or {})})


def load_modules(path: str | Path) -> tuple[dict[str, torch.nn.Module], dict]:
    """Rebuild every module in an exported file (strict: a missing or unexpected key is an error)."""
    tensors, meta = load_model_file(path)
    modules = {}
    for slot, module_spec in meta["modules"].items():
        module = build(module_spec)
        own, prefix = module.state_dict(), slot + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(state) != set(own):
            raise BenchWeightsError(f"bench weights file {path} does not match its config (keys differ: "
                                    f"{sorted(set(state) ^ set(own))[:4]}); {regenerate_hint(Path(path).name)}")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        modules[slot] = module.eval().requires_grad_(False)
    return modules, meta


# ---- pipelines ----

def bench_weight_files(name: str, weights_dir: str | Path | None = None) -> tuple[Path, Path, Path]:
    """The files bench model `name` is built from (tokenizer, VAE, model): what its identity hashes."""
    directory = resolve_dir(weights_dir)
    return directory / TOKENIZER_FILE, directory / "vae.safetensors", directory / f"{name}.safetensors"


def load_bench_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        weights_dir: str | Path | None = None):
    """The diffusers pipeline of bench model `name` ("bench_dit" | "bench_unet" | "bench_flow"), offline.

    `weights_dir` defaults to the package's qdrift/bench/weights.
    """
    if name not in configs.GENERATORS:
        raise ValueError(f"unknown bench model {name!r}; known: {configs.GENERATORS}")
    directory = resolve_dir(weights_dir)
    _, vae_file, model_file = bench_weight_files(name, directory)
    tokenizer = load_tokenizer(directory)
    vae = load_modules(vae_file)[0]["vae"]
    parts, meta = load_modules(model_file)
    sched = meta["scheduler"]
    scheduler = getattr(diffusers, sched["class"]).from_config(sched["kwargs"])
    pipeline_cls = getattr(diffusers, configs.PIPELINE[name])
    if name == "bench_dit":
        pipe = pipeline_cls(tokenizer=tokenizer, vae=vae, scheduler=scheduler, **parts)
    elif name == "bench_unet":
        pipe = pipeline_cls(tokenizer=tokenizer, vae=vae, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False, **parts)
    else:
        pipe = pipeline_cls(tokenizer=tokenizer, tokenizer_2=tokenizer, vae=vae, scheduler=scheduler, **parts)
    # Modules are built in float32 on the CPU; cast only when asked (diffusers warns on every dtype cast).
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    if torch.device(device).type != "cpu":
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(name: str, steps: int | None = None, guidance: float | None = None) -> dict:
    """Arguments of the pipeline call at the model's defaults (what conf/model/bench_*.yaml encodes)."""
    d = configs.SAMPLING[name]
    steps, guidance = steps or d["steps"], d["guidance"] if guidance is None else guidance
    common = dict(num_inference_steps=steps, height=configs.RESOLUTION, width=configs.RESOLUTION)
    if name == "bench_dit":
        return dict(common, guidance_scale=guidance, use_resolution_binning=False, clean_caption=False,
                    max_sequence_length=MAX_TOKENS)
    if name == "bench_unet":
        return dict(common, guidance_scale=guidance)
    return dict(common, true_cfg_scale=guidance, negative_prompt="", max_sequence_length=MAX_TOKENS)


@torch.no_grad()
def generate(pipe, name: str, prompts: list[str], seed: int = 0, batch_size: int = 16,
             steps: int | None = None, guidance: float | None = None) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [0, 1] (float32, CPU) for `prompts`; batch b uses noise seed `seed + b`."""
    out = []
    for b, a in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator(device="cpu").manual_seed(seed + b)
        images = pipe(prompts[a:a + batch_size], generator=gen, output_type="pt",
                      **call_kwargs(name, steps, guidance)).images
        out.append(images.float().cpu())
    return torch.cat(out)


def reinit_denoiser(pipe, seed: int = 0):
    """Replace the pipeline's denoiser by a freshly initialised one (the random-weights baseline)."""
    den = denoiser_of(pipe)
    attr = "unet" if getattr(pipe, "unet", None) is den else "transformer"
    torch.manual_seed(seed)
    fresh = type(den).from_config(den.config).eval()
    if den.dtype != fresh.dtype:
        fresh.to(dtype=den.dtype)
    if den.device != fresh.device:
        fresh.to(den.device)
    setattr(pipe, attr, fresh)
    return pipe

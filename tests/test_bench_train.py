"""train_bench.py --tiny end to end on CPU, the exported package, resumption, and the CLIP metrics."""
import importlib.util
import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

from qdrift.bench import configs
from qdrift.bench.grammar import ATTRIBUTES, MAX_TOKENS
from qdrift.bench.conditioning import encode, pack, unpack
from qdrift.bench.dataset import captions, reference_images
from qdrift.bench.evalclip import (
    EvalClip,
    attribute_accuracy,
    load_eval_clip,
    retrieval_accuracy,
)
from qdrift.bench.models import generate, load_bench_pipeline, load_tokenizer
from qdrift.bench.tokens import token_ids
from qdrift.bench.trainloop import StagePlan, StageRun
from qdrift.bench.weights import (
    REPORT_FILE,
    REQUIRED,
    BenchWeightsError,
    weights_available,
)

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "train_bench.py"
PIPELINES = {"bench_dit": diffusers.PixArtSigmaPipeline, "bench_unet": diffusers.StableDiffusionPipeline,
             "bench_flow": diffusers.FluxPipeline}


def _script():
    spec = importlib.util.spec_from_file_location("train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One --tiny --stage all run into a temp dir: (module, out dir, ckpt dir)."""
    root = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: threads only add synchronisation on a shared 2-core box
    try:
        script = _script()
        args = ["--tiny", "--stage", "all", "--out", str(root / "out"), "--ckpt", str(root / "ckpt")]
        assert script.main(args) == 0
        yield script, root / "out", root / "ckpt", args
    finally:
        torch.set_num_threads(threads)


def test_tiny_run_exports_a_compact_complete_package(tiny):
    _, out, ckpt, _ = tiny
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == set(REQUIRED) | {REPORT_FILE}
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    assert weights_available(out) and not weights_available(out / "nowhere")
    report = json.loads((out / REPORT_FILE).read_text())
    assert set(report["stages"]) == {"vae", "clip", "dit", "unet", "flow"}
    assert all(s["steps"] == 3 and s["final_loss"] > 0 for s in report["stages"].values())
    assert report["invocations"][-1]["note"] == "complete" and "--tiny" in report["invocations"][-1]["command"]
    r = report["report"]
    assert set(r["generators"]) == set(configs.GENERATORS)
    for g in r["generators"].values():
        assert set(g["fp_attribute_accuracy"]) == set(ATTRIBUTES) | {"mean"}
    assert json.loads((ckpt / "state.json").read_text())["done"] == ["vae", "clip", "dit", "unet", "flow", "report"]


@pytest.mark.parametrize("name", configs.GENERATORS)
def test_exported_pipeline_generates_through_the_normal_call(tiny, name):
    out = tiny[1]
    pipe = load_bench_pipeline(name, weights_dir=out)
    assert type(pipe) is PIPELINES[name]
    assert type(pipe.scheduler).__name__ == configs.SCHEDULERS[name][0]
    images = generate(pipe, name, captions("eval", 2), steps=2)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("name", configs.GENERATORS)
def test_training_conditioning_matches_the_pipeline(tiny, name):
    """Training feeds the denoiser exactly what the pipeline's own encode_prompt computes."""
    pipe = load_bench_pipeline(name, weights_dir=tiny[1])
    prompts = captions("eval", 3) + [""]
    ids, mask = token_ids(pipe.tokenizer, prompts, MAX_TOKENS)   # what training feeds (traindata.prepare)
    encoders = {k: getattr(pipe, k) for k in configs.TEXT_ENCODERS[name]}
    with torch.no_grad():
        ours = encode(name, encoders, ids, mask)
        if name == "bench_dit":
            emb, att, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                max_sequence_length=MAX_TOKENS)
            assert torch.equal(att, ours["encoder_attention_mask"])
            assert torch.allclose(emb, ours["encoder_hidden_states"])
        elif name == "bench_unet":
            emb, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            assert torch.allclose(emb, ours["encoder_hidden_states"])
        else:
            emb, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=MAX_TOKENS)
            assert torch.allclose(emb, ours["encoder_hidden_states"])
            assert torch.allclose(pooled, ours["pooled_projections"])
            assert torch.equal(text_ids, ours["txt_ids"])


def test_pack_is_the_pipelines_packing():
    x = torch.randn(2, 4, 16, 16)
    packed = pack(x)
    assert packed.shape == (2, 64, 16)
    assert torch.equal(unpack(packed, 16, 16), x)
    assert torch.equal(diffusers.FluxPipeline._unpack_latents(packed, 64, 64, 4), x)


def test_broken_weights_fail_loudly(tiny, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(tiny[1], out)
    blob = bytearray((out / "bench_dit.safetensors").read_bytes())
    blob[-10] ^= 0xFF                                    # one flipped bit in the tensor data
    (out / "bench_dit.safetensors").write_bytes(bytes(blob))
    with pytest.raises(BenchWeightsError, match=r"bench_dit\.safetensors.*corrupted.*train_bench\.py --stage dit"):
        load_bench_pipeline("bench_dit", weights_dir=out)
    (out / "bench_unet.safetensors").write_bytes((tiny[1] / "bench_unet.safetensors").read_bytes()[:-100])
    with pytest.raises(BenchWeightsError, match=r"bench_unet\.safetensors.*corrupted"):
        load_bench_pipeline("bench_unet", weights_dir=out)
    (out / "vae.safetensors").unlink()
    assert not weights_available(out)
    with pytest.raises(BenchWeightsError, match=r"vae\.safetensors is missing.*--stage vae"):
        load_bench_pipeline("bench_flow", weights_dir=out)


def test_rerun_skips_finished_stages(tiny):
    script, out, ckpt, args = tiny
    before = json.loads((out / REPORT_FILE).read_text())
    digest = (out / "bench_dit.safetensors").read_bytes()
    assert script.main(args) == 0
    after = json.loads((out / REPORT_FILE).read_text())
    assert len(after["invocations"]) == len(before["invocations"]) + 1
    assert after["stages"] == before["stages"] and (out / "bench_dit.safetensors").read_bytes() == digest


def test_extend_trains_a_finished_generator_further_from_its_export(tiny, tmp_path):
    script, out, _, _ = tiny
    shutil.copytree(out, tmp_path / "out")
    before = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["stages"]["dit"]
    weights = (tmp_path / "out" / "bench_dit.safetensors").read_bytes()
    args = ["--tiny", "--stage", "dit", "--extend", "--out", str(tmp_path / "out"), "--ckpt", str(tmp_path / "ck")]
    assert script.main(args) == 0
    after = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    dit = after["stages"]["dit"]
    assert dit["steps"] == 2 * before["steps"] and len(dit["segments"]) == 2
    assert [s["start"] for s in dit["segments"]] == ["init", "export"]
    assert dit["segments"][1]["stage_seed"] != dit["segments"][0]["stage_seed"]     # a fresh data order
    assert (tmp_path / "out" / "bench_dit.safetensors").read_bytes() != weights
    assert "report" not in after                                                     # stale report dropped
    assert after["stages"]["unet"] == json.loads((out / REPORT_FILE).read_text())["stages"]["unet"]
    with pytest.raises(SystemExit, match="one generator stage"):
        script.main(["--tiny", "--stage", "vae", "--extend", "--out", str(tmp_path / "out"), "--ckpt",
                     str(tmp_path / "ck")])
    with pytest.raises(SystemExit, match="nothing to extend"):
        script.main(["--tiny", "--stage", "dit", "--extend", "--out", str(tmp_path / "none"), "--ckpt",
                     str(tmp_path / "ck")])


def test_stages_extended_side_by_side_merge_back(tiny, tmp_path):
    script, out, _, _ = tiny
    base = tmp_path / "out"
    shutil.copytree(out, base)
    for stage in ("dit", "flow"):
        shutil.copytree(out, tmp_path / stage)
        assert script.main(["--tiny", "--stage", stage, "--extend", "--out", str(tmp_path / stage),
                            "--ckpt", str(tmp_path / f"ck_{stage}")]) == 0
    before = json.loads((base / REPORT_FILE).read_text())
    assert script.main(["--merge", str(tmp_path / "dit"), str(tmp_path / "flow"), "--out", str(base)]) == 0
    merged = json.loads((base / REPORT_FILE).read_text())
    assert len(merged["invocations"]) == len(before["invocations"]) + 2
    for i, stage in enumerate(("dit", "flow")):
        assert merged["stages"][stage] == {**json.loads((tmp_path / stage / REPORT_FILE).read_text())["stages"][stage],
                                           "segments": merged["stages"][stage]["segments"]}
        assert merged["stages"][stage]["segments"][-1]["invocation"] == len(before["invocations"]) + i
        file = f"bench_{stage}.safetensors"
        assert (base / file).read_bytes() == (tmp_path / stage / file).read_bytes()
    assert merged["stages"]["unet"] == before["stages"]["unet"]
    with pytest.raises(SystemExit, match="more than one"):     # the same stage from two copies
        script.main(["--merge", str(tmp_path / "dit"), str(tmp_path / "dit"), "--out", str(out)])
    with pytest.raises(SystemExit, match="missing"):          # not a copy of a weights folder
        script.main(["--merge", str(tmp_path / "nowhere"), "--out", str(out)])


def test_a_failed_stage_is_recorded_as_failed(tiny, tmp_path, monkeypatch):
    script, out, _, _ = tiny
    shutil.copytree(out, tmp_path / "out")

    def diverge(run):
        raise FloatingPointError("[dit] loss is nan at step 7")
    monkeypatch.setitem(script.RUNNERS, "dit", diverge)
    with pytest.raises(FloatingPointError):
        script.main(["--tiny", "--stage", "dit", "--extend", "--out", str(tmp_path / "out"), "--ckpt",
                     str(tmp_path / "ck")])
    last = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["invocations"][-1]
    assert last["note"] == "dit failed: FloatingPointError: [dit] loss is nan at step 7"


class _Budget:
    """Runs out after `steps` checks, like a wall clock that hits the invocation deadline."""

    def __init__(self, steps: int):
        self.steps = steps

    def left(self) -> float:
        self.steps -= 1
        return 1e9 if self.steps >= 0 else -1.0

    def used_minutes(self) -> float:
        return 0.0


def _stage(path: Path) -> tuple[StageRun, torch.nn.Module]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    plan = StagePlan(minutes=1e9, max_steps=6, batch_size=5, lr=1e-2, warmup=2, log_every=2)
    return StageRun("toy", {"net": net}, plan, torch.device("cpu"), seed=1, checkpoint=path, log=lambda m: None), net


def _loss(net):
    def fn(gen):
        x = torch.randn(5, 4, generator=gen)
        return (net(x).squeeze(1) - x.sum(1)).pow(2).mean()
    return fn


def test_interrupted_stage_resumes_exactly(tmp_path):
    straight, net = _stage(tmp_path / "a.pt")
    assert straight.run(_loss(net), _Budget(100), reserve_s=0)
    first, net1 = _stage(tmp_path / "b.pt")
    assert not first.run(_loss(net1), _Budget(4), reserve_s=0)      # stops after 4 steps, checkpoints
    assert first.step == 4 and (tmp_path / "b.pt").is_file()
    second, net2 = _stage(tmp_path / "b.pt")                         # a new process would rebuild from scratch
    assert second.step == 4
    assert second.run(_loss(net2), _Budget(100), reserve_s=0) and second.step == 6
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow, second.ema.shadow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["loss", "grads"])
def test_divergence_stops_the_stage_with_a_clear_error(tmp_path, bad):
    run, net = _stage(tmp_path / "c.pt")
    fit = _loss(net)

    def diverging(gen):
        loss = fit(gen)
        if run.step < 3:
            return loss
        if bad == "loss":
            return loss * float("nan")
        w = net[0].weight
        return loss + (w - w.detach()).abs().sqrt().sum()   # value +0, gradient of sqrt at 0: inf

    with pytest.raises(FloatingPointError, match=("loss is nan" if bad == "loss" else "gradients are not finite")
                       + " at step 4: training diverged"):
        run.run(diverging, _Budget(100), reserve_s=0)
    assert not (tmp_path / "c.pt").exists()


def test_eval_clip_loads_and_scores(tiny):
    clip = load_eval_clip(weights_dir=tiny[1])
    model, tokenize_fn, size, mean, std = clip
    assert size == 64 and len(mean) == len(std) == 3
    caps = captions("eval", 6)
    assert tokenize_fn(caps).shape == (6, MAX_TOKENS)
    refs = reference_images(caps)
    acc = attribute_accuracy(refs, caps, clip)
    assert set(acc) == set(ATTRIBUTES) | {"mean"} and all(0 <= v <= 1 for v in acc.values())
    assert 0 <= retrieval_accuracy(refs, caps, clip) <= 1


class _BagOfWords(torch.nn.Module):
    """A fake CLIP: text -> normalised word counts; image i -> the text features of table[i]
    (the image index rides in pixel [0, 0, 0])."""

    def __init__(self, tokenizer, table: list[str]):
        super().__init__()
        self.vocab = len(tokenizer)
        self.table = self.encode_text(tokenizer(table, padding="max_length", max_length=MAX_TOKENS,
                                                return_tensors="pt").input_ids)

    def encode_text(self, ids, normalize=True):
        bags = torch.zeros(ids.shape[0], self.vocab).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
        bags[:, 0] = 0                                                         # padding
        return torch.nn.functional.normalize(bags, dim=-1)

    def encode_image(self, images, normalize=True):
        return self.table[(images[:, 0, 0, 0] * 1000).round().long()]


def test_attribute_accuracy_rewards_the_truth_and_punishes_swaps(tiny):
    import random

    from qdrift.bench.grammar import caption_of, random_swap, scene_of
    tok = load_tokenizer(tiny[1])
    caps = captions("eval", 12)
    images = torch.zeros(12, 3, 64, 64)
    images[:, 0, 0, 0] = torch.arange(12) / 1000
    def tokenize_fn(texts):
        return tok(list(texts), padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids

    oracle = EvalClip(_BagOfWords(tok, caps), tokenize_fn, 64, (0.0,) * 3, (1.0,) * 3)
    assert attribute_accuracy(images, caps, oracle)["mean"] == 1.0
    assert retrieval_accuracy(images, caps, oracle) == 1.0
    rng = random.Random(0)
    wrong_colour = [caption_of(random_swap(scene_of(c), rng, "colour")) for c in caps]
    fooled = EvalClip(_BagOfWords(tok, wrong_colour), tokenize_fn, 64, (0.0,) * 3, (1.0,) * 3)
    acc = attribute_accuracy(images, caps, fooled)
    # Images that show another colour: colour judged wrong (ties count as wrong), other attributes right.
    assert acc["colour"] <= 0.25 and acc["background"] == acc["shape"] == acc["position"] == 1.0


@pytest.mark.parametrize("name", configs.GENERATORS)
def test_training_convention_matches_the_sampler(tiny, name):
    """An oracle denoiser built from the training objective (the ideal output when the data is one
    latent x0) makes the stock pipeline return exactly decode(x0): training and sampling agree on
    timestep scale, noise schedule, latent scaling and packing."""
    from qdrift.bench.objectives import DenoisingLoss
    pipe = load_bench_pipeline(name, weights_dir=tiny[1])
    vae, objective = pipe.vae, DenoisingLoss(name, torch.device("cpu"))
    image = reference_images(captions("eval", 1)) * 2 - 1
    with torch.no_grad():
        x0 = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
        expected = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    target = pack(x0) if name == "bench_flow" else x0
    denoiser = pipe.unet if name == "bench_unet" else pipe.transformer

    def oracle(*args, **kwargs):
        x_t = kwargs.get("hidden_states", args[0] if args else None)
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        return (objective.ideal_output(x_t, t, target.expand_as(x_t)),)

    denoiser.forward = oracle
    steps = configs.SAMPLING[name]["steps"]
    got = generate(pipe, name, captions("eval", 2), steps=steps)
    assert torch.allclose(got, expected.expand_as(got), atol=2e-3), (got - expected).abs().max()

"""Every supported text-to-image family as a classifier, on tiny random pipelines.

For each family a tiny pipeline is built from config and saved with the pipeline's own
``save_pretrained``; ``load_backend`` loads the folder. Against the same folder loaded by
diffusers itself, the tests check that

* a class's conditioning is what the pipeline's ``encode_prompt`` returns (no CFG);
* x0 is the pipeline's image preprocessing and VAE latent (shifted and scaled);
* x0_hat from our ``predict`` equals what the pipeline's own one-step denoise from
  (x_t, t) gives: its prompt encoding, its denoiser call and its scheduler's conversion
  (the DDPM ``pred_original_sample``, or the flow Euler step from sigma to 0);
* images classify through the ``classify`` command.

Plus: flow-matching scoring on shared noise under each weighting, the shifted sigma grids,
``difflabel models``, and one-line refusals of unsupported families and single files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tiny_pipelines as tp
from worker.backends import load_backend
from worker.backends.base import Cond
from worker.config import ScoringConfig
from worker.errors import ModelNotFoundError, UsageError
from worker.noise import draw
from worker.scoring import RoundRequest, flow_to_x0_eps, score_round, to_x0_eps

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a red car"]
FAMILY_NAMES = ["sdxl", "sd3", "flux", "pixart", "deepfloyd-if"]
BACKENDS = {"sdxl": "SDXLBackend", "sd3": "SD3Backend", "flux": "FluxBackend", "pixart": "PixArtBackend",
            "deepfloyd-if": "DeepFloydBackend"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family)`` -> (folder, loaded CPU backend), built once per module."""
    cache: dict[str, tuple[Path, object]] = {}

    def make(family: str):
        if family not in cache:
            path = tp.save(family, tmp_path_factory.mktemp(family) / "model")
            cache[family] = (path, load_backend(str(path), device="cpu"))
        return cache[family]

    return make


def reference(path: Path):
    """The folder as diffusers itself loads it (float32, CPU)."""
    import diffusers

    name = json.loads((path / "model_index.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(path)


@torch.no_grad()  # as the pipeline's __call__ runs it (autograd picks other T5 kernels)
def reference_conditioning(family: str, pipe, backend) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt for PROMPTS, without classifier-free guidance."""
    if family == "sdxl":
        e, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        return {"embeds": e, "pooled": pooled}
    if family == "sd3":
        e, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
        return {"embeds": e, "pooled": pooled}
    if family == "flux":
        e, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu")  # its __call__ default: 512 T5 tokens
        return {"embeds": e, "pooled": pooled}
    if family == "pixart":
        e, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu")
        return {"embeds": e, "mask": mask}
    e, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu")
    return {"embeds": e}


@torch.no_grad()
def reference_x0(family: str, pipe, image: Image.Image, size: int) -> torch.Tensor:
    """The pipeline's preprocessing of a size x size image, then its VAE latent mean shifted
    and scaled as its img2img pipelines do; IF: the pixels in [-1, 1]."""
    if family == "deepfloyd-if":
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    px = pipe.image_processor.preprocess(image, height=size, width=size)
    z = pipe.vae.encode(px).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (z - shift) * pipe.vae.config.scaling_factor


def reference_x0_hat(family: str, pipe, backend, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The pipeline's own denoising step from (x_t, t) for each of PROMPTS, to x0_hat.

    DDPM families: the pipeline runs with its scheduler swapped for the DDPM scheduler of the
    same config (no clipping, no thresholding), one custom timestep t, and we keep the
    ``pred_original_sample`` its step computes. Flow families: one step on sigmas [s] (the
    unshifted grid point the pipeline shifts to our sigma_t) ends at sigma 0: x0_hat."""
    from diffusers import DDPMScheduler

    k, size = len(PROMPTS), backend.image_size
    if family in ("sd3", "flux"):
        T = backend.schedule.num_timesteps
        unshifted = float(np.linspace(1.0, 1.0 / T, T, dtype=np.float32)[::-1][t])
        if family == "sd3":
            return pipe(PROMPTS, sigmas=[unshifted], latents=x_t, height=size, width=size, guidance_scale=1.0,
                        output_type="latent").images
        c, h, w = x_t.shape[1:]
        out = pipe(PROMPTS, sigmas=[unshifted], latents=pipe._pack_latents(x_t, k, c, h, w), height=size,
                   width=size, guidance_scale=1.0, output_type="latent").images
        return pipe._unpack_latents(out, size, size, pipe.vae_scale_factor)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
    seen = {}
    step = pipe.scheduler.step

    def spy(*args, return_dict=True, **kw):
        out = step(*args, return_dict=True, **kw)
        seen["x0_hat"] = out.pred_original_sample
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    pipe.scheduler.step = spy
    common = dict(timesteps=[t], height=size, width=size, guidance_scale=1.0)
    if family == "sdxl":
        pipe(PROMPTS, latents=x_t, output_type="latent", **common)
    elif family == "pixart":
        pipe(PROMPTS, latents=x_t, output_type="latent", use_resolution_binning=False, clean_caption=False, **common)
    else:  # IF takes no latents argument: its first intermediate images are x_t
        pipe.prepare_intermediate_images = lambda *a, **kw: x_t.clone()
        pipe(PROMPTS, output_type="pt", clean_caption=False, **common)
    return seen["x0_hat"]


def _images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB") for _ in range(n)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_matches_its_pipeline_and_classifies(family, tiny, tmp_path):
    path, b = tiny(family)
    assert type(b).__name__ == BACKENDS[family] and b.family == family
    assert b.default_template == tp.TEMPLATE
    ref = reference(path)

    # 1. Conditioning: exactly the pipeline's encode_prompt.
    cond = b.encode_prompts(PROMPTS)
    want = reference_conditioning(family, ref, b)
    assert set(cond.parts) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(cond.parts[name], tensor, rtol=0, atol=0, msg=f"{family} {name}")
    assert not torch.equal(cond.embeds[0], cond.embeds[1])  # the prompt reaches the embedding

    # 2. x0: the pipeline's preprocessing and (shifted, scaled) VAE latent of a native-size image.
    image = _images(1, b.image_size, seed=3)[0]
    x0 = b.encode_images([image])
    torch.testing.assert_close(x0, reference_x0(family, ref, image, b.image_size), rtol=1e-5, atol=1e-5)

    # 3. x0_hat: our predict + conversion against the pipeline's own denoising step.
    g = torch.Generator().manual_seed(0)
    k = len(PROMPTS)
    T = b.schedule.num_timesteps
    for t in (90, 700):
        eps = torch.randn((1, *x0.shape[1:]), generator=g)
        tt = torch.full((k,), t, dtype=torch.long)
        if b.schedule.is_flow:
            sigma = b.schedule.sigmas[t]
            x_t = ((1 - sigma) * x0 + sigma * eps).repeat(k, 1, 1, 1)
            ours, _ = flow_to_x0_eps(b.predict(x_t, tt, cond).float(), x_t, sigma)
        else:
            abar = b.schedule.alphas_cumprod[t]
            x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).repeat(k, 1, 1, 1)
            ours, _ = to_x0_eps(b.predict(x_t, tt, cond).float(), x_t, abar.view(1, 1, 1, 1),
                                b.schedule.prediction_type)
        assert 0 <= t < T
        want = reference_x0_hat(family, ref, b, x_t.clone(), t)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4, msg=f"{family} x0_hat at t={t}")
        assert not torch.allclose(ours[0], ours[1])  # the class changes the prediction

    # 4. The classify command on two images.
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(_images(2, 20, seed=1)):
        im.save(folder / f"img{i}.png")
    from orchestrator import job_commands, local_commands  # noqa: F401 - registers commands
    from orchestrator.cli import cli

    r = CliRunner().invoke(cli, ["classify", str(folder), "--model", str(path), "--labels", "cat,dog", "--device",
                                 "cpu", "--min-scores", "2", "--max-scores", "4", "-o", "jsonl", "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(row["status"] == "done" and row["label"] in ("cat", "dog") for row in rows)
    assert all(2 * 2 <= row["n_evals"] <= 2 * 4 for row in rows)


# --------------------------------------------------------------------------- flow matching


def test_flow_sigmas_are_the_schedulers_own(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    _, sd3 = tiny("sd3")
    cfg = json.loads((tiny("sd3")[0] / "scheduler" / "scheduler_config.json").read_text())
    # SD3: a static shift of 3; the scheduler's own training grid, ascending.
    want = FlowMatchEulerDiscreteScheduler.from_config(cfg).sigmas.flip(0)
    torch.testing.assert_close(sd3.schedule.sigmas, want, rtol=0, atol=1e-6)
    assert sd3.schedule.sigmas[0] > 1 / 1000 and sd3.schedule.sigmas[-1] == pytest.approx(1.0)
    assert sd3.schedule.sigmas[500] == pytest.approx(3 * 0.501 / (1 + 2 * 0.501), abs=1e-6)
    # FLUX: the dynamic shift of its image token count, (32 / 2 / 2)^2 = 64 packed tokens here.
    path, flux = tiny("flux")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    c = sched.config
    mu = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(num_inference_steps=1000, mu=mu)
    torch.testing.assert_close(flux.schedule.sigmas, sched.sigmas[:-1].flip(0), rtol=0, atol=1e-6)
    assert flux.guidance == 1.0 and flux.max_sequence_length == 512


@pytest.mark.parametrize("weighting", ["heuristic", "velocity", "uniform"])
def test_flow_scoring_on_shared_noise_matches_independent_computation(tiny, weighting):
    _, b = tiny("sd3")
    cond = b.encode_prompts(PROMPTS)
    x0 = b.encode_images(_images(1, b.image_size, seed=5))[0]
    config = ScoringConfig(weighting=weighting, seed=11)
    n = 4
    (got,) = score_round(b, [RoundRequest("item", x0, [0, 1, 2], 0, n)], cond, config)
    t, eps = draw(11, "item", 0, n, tuple(x0.shape), b.schedule.num_timesteps)
    assert got.shape == (3, n)
    for k in range(3):
        sigma = b.schedule.sigmas[t].view(-1, 1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * eps  # the same (sigma, eps) for every class
        v_hat = b.predict(x_t, t, cond[torch.full((n,), k)]).float()
        x0_hat = x_t - sigma * v_hat
        if weighting == "heuristic":
            want = torch.exp(-7.0 * sigma.flatten()) * (x0 - x0_hat).pow(2).flatten(1).mean(1)
        elif weighting == "velocity":
            want = ((eps - x0) - v_hat).pow(2).flatten(1).mean(1)
        else:
            want = (eps - (x_t + (1 - sigma) * v_hat)).pow(2).flatten(1).mean(1)
        np.testing.assert_allclose(got[k], want.numpy(), rtol=1e-5, atol=1e-7)


def test_velocity_weighting_on_a_ddpm_model(tiny):
    """"velocity" on an epsilon model is the v-parameterisation's error: v - v_hat =
    sqrt(abar)(eps - eps_hat) - sqrt(1 - abar)(x0 - x0_hat) = (eps - eps_hat) / sqrt(abar)."""
    _, b = tiny("pixart")
    cond = b.encode_prompts(PROMPTS[:2])
    x0 = b.encode_images(_images(1, b.image_size))[0]
    n = 3
    (vel,) = score_round(b, [RoundRequest("k", x0, [0, 1], 0, n)], cond, ScoringConfig(weighting="velocity", seed=2))
    (uni,) = score_round(b, [RoundRequest("k", x0, [0, 1], 0, n)], cond, ScoringConfig(weighting="uniform", seed=2))
    t, _ = draw(2, "k", 0, n, tuple(x0.shape), b.schedule.num_timesteps)
    abar = b.schedule.alphas_cumprod[t].numpy()
    np.testing.assert_allclose(vel, uni / abar[None, :], rtol=1e-4)


def test_sd3_without_t5_matches_the_pipeline_without_t5(tiny, tmp_path):
    import shutil

    from diffusers import StableDiffusion3Pipeline

    src, _ = tiny("sd3")
    path = tmp_path / "sd3-no-t5"
    shutil.copytree(src, path)
    (path / "difflabel.json").write_text(json.dumps({"t5": False}))
    b = load_backend(str(path), device="cpu")
    ref = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    e, _, pooled, _ = ref.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    cond = b.encode_prompts(PROMPTS)
    assert torch.equal(cond.embeds, e) and torch.equal(cond.pooled, pooled)
    assert torch.count_nonzero(cond.embeds[:, tp.CLIP_TOKENS:]) == 0  # zeros where T5 would be


def test_cond_indexes_like_a_tensor():
    c = Cond(embeds=torch.arange(12.0).view(3, 2, 2), pooled=torch.arange(3.0))
    sub = c[torch.tensor([2, 0, 2])]
    assert len(sub) == 3 and sub.shape == (3, 2, 2)
    assert sub.pooled.tolist() == [2.0, 0.0, 2.0]
    assert torch.equal(Cond.cat([c[:1], c[1:]]).embeds, c.embeds)


# --------------------------------------------------------------------------- refusals and listing


@pytest.mark.parametrize("class_name,named", [("KandinskyV22Pipeline", "Kandinsky"),
                                              ("CogVideoXPipeline", "video"),
                                              ("IFSuperResolutionPipeline", "stage I"),
                                              ("SanaPipeline", "SanaPipeline")])
def test_unsupported_family_is_refused_in_one_line(tmp_path, class_name, named):
    d = tmp_path / class_name
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": class_name, "unet": ["diffusers", "X"]}))
    with pytest.raises(UsageError) as e:
        load_backend(str(d), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "difflabel models" in msg


def test_submit_refuses_an_unsupported_family_before_queueing(tmp_path):
    from orchestrator.job_commands import _check_model

    d = tmp_path / "kandinsky"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UsageError, match="Kandinsky"):
        _check_model(str(d))
    _check_model(str(_fake_checkpoint(tmp_path / "one.safetensors", ["x"])))  # a file: the worker decides


def _fake_checkpoint(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty, offline Hugging Face cache."""
    import socket

    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a unit test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


def test_single_file_is_routed_by_its_keys(tmp_path, offline):
    # An SDXL checkpoint is recognised and sent to from_single_file, which needs SDXL's
    # configuration from the hub: offline and uncached, one line says so.
    sdxl = _fake_checkpoint(tmp_path / "sdxl.safetensors",
                            ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"])
    with pytest.raises(ModelNotFoundError) as e:
        load_backend(str(sdxl), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(sdxl) in msg and "Stable Diffusion XL" in msg
    assert "stabilityai/stable-diffusion-xl-base-1.0" in msg
    # A family with no single-file route here: refused by name.
    video = _fake_checkpoint(tmp_path / "video.safetensors",
                             ["txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias"])
    with pytest.raises(UsageError, match="'hunyuan-video' checkpoint"):
        load_backend(str(video), device="cpu")
    # Weights of nothing diffusers knows: not guessed to be SD 1.x.
    other = _fake_checkpoint(tmp_path / "other.safetensors", ["encoder.layer.0.weight"])
    with pytest.raises(ModelNotFoundError, match="not a checkpoint of a known diffusion model"):
        load_backend(str(other), device="cpu")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\0" * 8)
    with pytest.raises(ModelNotFoundError, match=r"\.safetensors only"):
        load_backend(str(ckpt), device="cpu")


def test_models_command_lists_the_families():
    from orchestrator import job_commands, local_commands  # noqa: F401 - registers commands
    from orchestrator.cli import cli

    r = CliRunner().invoke(cli, ["models", "-o", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    by_name = {row["family"]: row for row in rows}
    assert set(by_name) == {"sd", "sdxl", "sd3", "flux", "pixart", "deepfloyd-if"}
    assert "FluxPipeline" in by_name["flux"]["pipelines"] and "1024" in by_name["flux"]["resolution"]
    assert "64" in by_name["deepfloyd-if"]["resolution"]
    table = CliRunner().invoke(cli, ["models"], catch_exceptions=False).stdout
    for title in ("Stable Diffusion XL", "FLUX.1", "PixArt", "DeepFloyd IF", "Stable Diffusion 3"):
        assert title in table


def test_submit_reads_the_tokenizer_the_model_truncates_with(tiny):
    """`submit` refuses labels whose prompts read the same; for FLUX that is T5's tokenizer
    (tokenizer_2/), not the 77-token CLIP one."""
    from worker.model_files import load_tokenizer

    path, _ = tiny("flux")
    tok = load_tokenizer(str(path))
    assert tok("a photo of a cat")["input_ids"][-1] == 1  # T5's </s>
    tok = load_tokenizer(str(tiny("sdxl")[0]))
    assert tok.model_max_length == tp.CLIP_TOKENS

"""What every diffusers-pipeline family shares: loading, prompt batches, VAE latents, schedules.

A family adapter (``sdxl``, ``sd3``, ``flux``, ``pixart``, ``deepfloyd``) holds the
pipeline object diffusers builds from the model's files and uses two things from it: its
own ``encode_prompt`` (so a class's conditioning is exactly what the pipeline would feed
its denoiser for that prompt, without classifier-free guidance) and its denoiser, called
as the pipeline's denoising loop calls it. The adapter adds only ``predict``.

Images become x0 once: centre-cropped and resized to the native resolution, then either
kept as pixels in [-1, 1] (DeepFloyd IF) or encoded, by the VAE in fp32, to the latent
mean, shifted and scaled as the pipeline does, ``(z - shift_factor) * scaling_factor``.

Text encoders hold the device only while a label set is encoded: T5-XXL alone is 9.5 GB in
bf16, as much as an SD3 MMDiT. They come to the device for ``encode_prompts`` and are
released after it (``release_text_encoders``): a folder's encoders are dropped and read
again from disk when the next label set arrives (workers encode each label set once and
keep its conditioning), a single file's go back to host memory. The denoiser and the VAE
alone stay on the device.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.backends.base import FLOW, PREDICTION_TYPES, PROMPT_BATCH, Backend, Cond, NoiseSchedule, pil_to_tensor
from worker.errors import ModelNotFoundError, UsageError
from worker.families import Family

#: model_index.json components a classifier never needs (loaded as None when absent).
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker", "image_encoder")
#: Pipeline components that encode prompts: on the device only while a label set is encoded.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class PipelineBackend(Backend):
    """A text-to-image pipeline's text encoders, denoiser and VAE, ready to score."""

    pipe: Any = None
    #: The UNet or transformer (``compile`` wraps this one).
    denoiser: Any = None
    vae: Any = None
    #: The tokenizer whose truncation decides when two prompts read the same.
    tokenizer: Any = None
    family: str = ""
    image_size: int = 1024
    latent_shift: float = 0.0
    latent_scale: float = 1.0
    encode_batch_size: int = 8
    #: The pipeline's text encoders (component names; SD3 without T5 has two).
    text_encoders: tuple[str, ...] = ()

    def _encode(self, prompts: list[str]) -> Cond:
        """A batch of prompts -> conditioning, through the pipeline's own encode_prompt."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """K prompts -> conditioning on the device; the text encoders are released after."""
        self.load_text_encoders()
        try:
            parts = [self._encode(list(prompts[s : s + PROMPT_BATCH])) for s in range(0, len(prompts), PROMPT_BATCH)]
            return Cond.cat(parts).to(self.device)
        finally:
            self.release_text_encoders()

    def load_text_encoders(self) -> None:
        """Every text encoder on the device: read again from the model folder if released."""
        for name in self.text_encoders:
            module = getattr(self.pipe, name, None)
            if module is None:
                module = load_component(self.path, name, self.dtype)
                object.__setattr__(self.pipe, name, module)  # the pipeline's config keeps its entry
            module.to(self.device)

    def release_text_encoders(self) -> None:
        """Free the text encoders' device memory: dropped when they can be read again from the
        model folder, else (a single file) moved to host memory."""
        for name in self.text_encoders:
            module = getattr(self.pipe, name, None)
            if module is None:
                continue
            if self.path is not None and (Path(self.path) / name).is_dir():
                object.__setattr__(self.pipe, name, None)
            else:
                module.to("cpu")
            module = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """N images -> x0 (N, C, H, W) float32: pixels in [-1, 1], or the scaled VAE latent mean."""
        out = []
        for i in range(0, len(images), self.encode_batch_size):
            px = torch.stack([pil_to_tensor(im, self.image_size, 3) for im in images[i : i + self.encode_batch_size]])
            if self.vae is None:
                out.append(px.to(self.device))
                continue
            latent = self.vae.encode(px.to(self.device, self.vae.dtype)).latent_dist.mean
            out.append((latent.float() - self.latent_shift) * self.latent_scale)
        return torch.cat(out)


# --------------------------------------------------------------------------- loading


def load_pipeline(family: Family, class_name: str, path: Path, spec: str, dtype: torch.dtype,
                  meta: dict) -> Any:
    """The diffusers pipeline saved in ``path``, in ``dtype``, without the components a
    classifier never runs (safety checker, watermarker...) when they are not on disk."""
    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    overrides: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[:1] == [None]:
            continue
        if not (path / name).is_dir():
            if name not in OPTIONAL_COMPONENTS and not _optional_text_encoder(family, name):
                raise ModelNotFoundError(
                    f"model {spec!r} at {path} has no {name}/ folder: the download is incomplete, fetch it again")
            overrides[name] = None
    if family.name == "sd3" and meta.get("t5") is False:  # the pipeline's own T5-less mode
        overrides.update(text_encoder_3=None, tokenizer_3=None)
    cls = getattr(diffusers, class_name)
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        overrides["requires_safety_checker"] = False
    return cls.from_pretrained(path, dtype=dtype, **overrides)


def load_component(path: Path | None, name: str, dtype: torch.dtype) -> Any:
    """One component of a pipeline folder, loaded as the pipeline loads it: the class that
    model_index.json names, from ``path / name``, in ``dtype``."""
    if path is None:
        raise ModelNotFoundError(f"cannot reload {name}: the model was not loaded from a folder")
    library, class_name = json.loads((Path(path) / "model_index.json").read_text())[name]
    cls = getattr(importlib.import_module(library), class_name)
    try:
        return cls.from_pretrained(Path(path) / name, dtype=dtype).eval()
    except Exception as e:  # noqa: BLE001 - the folder changed under a running worker
        raise ModelNotFoundError(f"could not reload {name} from {path}: {type(e).__name__}: {e}"[:300]) from e


def _optional_text_encoder(family: Family, name: str) -> bool:
    """SD3 runs without T5 (zeros in its place), as its pipeline allows."""
    return family.name == "sd3" and name in ("text_encoder_3", "tokenizer_3")


def call_default(pipe: Any, name: str, fallback: Any = None) -> Any:
    """The default of a ``__call__`` argument of the pipeline (e.g. max_sequence_length)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def prepare_vae(vae: Any) -> Any:
    """The VAE in fp32: it encodes each image once (a few TFLOPs at 1024 pixels against the
    denoiser's thousands of calls), and SDXL's overflows in fp16 (its ``force_upcast``)."""
    if vae is not None and vae.dtype != torch.float32:
        vae.to(torch.float32)
    return vae


def latent_transform(vae: Any) -> tuple[float, float]:
    """(shift, scale) with x0 = (z - shift) * scale, from the VAE config."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return float(shift), float(scale)


def ddpm_schedule(scheduler_config: Any, spec: str, device: torch.device) -> NoiseSchedule:
    """The DDPM training schedule behind a sampler's config (Euler, DPM-Solver, DDPM...)."""
    from diffusers import DDPMScheduler

    name = str(scheduler_config.get("_class_name", ""))
    if "EDM" in name or "Consistency" in name:
        raise UsageError(f"model {spec!r} uses a {name} schedule, which difflabel does not support")
    sched = DDPMScheduler.from_config(scheduler_config)
    if sched.config.prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"model {spec!r} has unsupported prediction_type {sched.config.prediction_type!r}")
    return NoiseSchedule(sched.alphas_cumprod.to(device, torch.float32), sched.config.prediction_type)


def flow_sigmas(scheduler_config: Any, image_seq_len: int) -> torch.Tensor:
    """The flow model's training sigmas (T,) ascending, shifted as its scheduler shifts them.

    The unshifted grid is FlowMatchEulerDiscreteScheduler's own, sigma_i = i/T for
    i = 1..T; the scheduler then applies its static ``shift`` (sigma' = s sigma / (1 + (s - 1)
    sigma), SD3) or, with ``use_dynamic_shifting``, the resolution-dependent shift of mu =
    calculate_shift(image tokens) (FLUX; e^mu / (e^mu + 1/sigma - 1))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(
        scheduler_config, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    cfg = sched.config
    T = int(cfg.num_train_timesteps)
    mu = None
    if cfg.use_dynamic_shifting:
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = cfg.base_shift + slope * (image_seq_len - cfg.base_image_seq_len)  # diffusers' calculate_shift
    grid = np.linspace(1.0, 1.0 / T, T, dtype=np.float32)
    sched.set_timesteps(sigmas=grid, mu=mu)
    return sched.sigmas[:-1].flip(0).float()  # drop the terminal 0; ascending


def flow_schedule(scheduler_config: Any, image_seq_len: int, spec: str, device: torch.device) -> NoiseSchedule:
    name = str(scheduler_config.get("_class_name", ""))
    if name != "FlowMatchEulerDiscreteScheduler":
        raise UsageError(f"model {spec!r} uses a {name} schedule, which difflabel does not support")
    return NoiseSchedule(None, FLOW, flow_sigmas(scheduler_config, image_seq_len).to(device))


def place(module: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a denoiser to the device, in eval mode (channels-last for UNets on CUDA)."""
    module.to(device).eval()
    if channels_last and device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module

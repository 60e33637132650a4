"""Build a family adapter from a loaded diffusers pipeline (a folder or a single file).

Per family: which adapter, the native resolution, the schedule (DDPM or flow matching,
read from the pipeline's scheduler config) and the family's fixed inputs (SDXL's time ids,
FLUX's guidance and T5 length, PixArt's micro-conditions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worker.backends.base import Backend
from worker.backends.pipeline import (TEXT_ENCODERS, call_default, ddpm_schedule, flow_schedule, latent_transform,
                                      place, prepare_vae)
from worker.errors import ModelNotFoundError, UsageError
from worker.families import SINGLE_FILE_TYPES, Family, by_name


def build(family: Family, pipe: Any, *, spec: str, device: torch.device, dtype: torch.dtype, meta: dict,
          path: Path | None, calibration: dict | None) -> Backend:
    """The adapter for ``family`` around ``pipe``: the denoiser and VAE moved to ``device``;
    the text encoders stay in host memory until a label set is encoded (then they are released)."""
    encoders = tuple(n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name not in encoders:
            module.to(device)
    common = dict(name=spec, device=device, dtype=dtype, default_template=meta.get("default_template"),
                  calibration=calibration, path=path, pipe=pipe, family=family.name, text_encoders=encoders)
    size = meta.get("image_size")
    if family.name == "sdxl":
        from worker.backends.sdxl import SDXLBackend, time_ids

        vae = prepare_vae(pipe.vae)
        size = int(size or pipe.default_sample_size * pipe.vae_scale_factor)
        pooled_dim = int(pipe.text_encoder_2.config.projection_dim)
        shift, scale = latent_transform(vae)
        return SDXLBackend(**common, schedule=ddpm_schedule(pipe.scheduler.config, spec, device),
                           denoiser=place(pipe.unet, device, channels_last=True), vae=vae, tokenizer=pipe.tokenizer,
                           image_size=size, latent_shift=shift, latent_scale=scale,
                           time_ids=time_ids(pipe, size, pooled_dim, dtype, device))
    if family.name in ("sd3", "flux"):
        vae = prepare_vae(pipe.vae)
        size = int(size or pipe.default_sample_size * pipe.vae_scale_factor)
        latent = size // pipe.vae_scale_factor
        if latent % 2:
            raise UsageError(f"model {spec!r}: image_size {size} must be a multiple of {2 * pipe.vae_scale_factor}")
        shift, scale = latent_transform(vae)
        shared = dict(denoiser=place(pipe.transformer, device), vae=vae, image_size=size, latent_shift=shift,
                      latent_scale=scale)
        if family.name == "sd3":
            from worker.backends.sd3 import SD3Backend

            tokens = (latent // pipe.transformer.config.patch_size) ** 2
            length = int(meta.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 256))
            return SD3Backend(**common, **shared, schedule=flow_schedule(pipe.scheduler.config, tokens, spec, device),
                              tokenizer=_prompt_tokenizer(pipe, ("tokenizer_3", "tokenizer"), length),
                              max_sequence_length=length)
        from worker.backends.flux import DEFAULT_GUIDANCE, FluxBackend

        tokens = (latent // 2) ** 2  # packed 2 x 2
        distilled = bool(pipe.transformer.config.guidance_embeds)
        # schnell (no guidance embedding) was trained on 256 T5 tokens, dev on 512.
        length = int(meta.get("max_sequence_length") or (call_default(pipe, "max_sequence_length", 512)
                                                          if distilled else 256))
        guidance = float(meta.get("guidance", DEFAULT_GUIDANCE)) if distilled else None
        return FluxBackend(**common, **shared, schedule=flow_schedule(pipe.scheduler.config, tokens, spec, device),
                           tokenizer=_prompt_tokenizer(pipe, ("tokenizer_2",), length),
                           max_sequence_length=length, guidance=guidance, vae_scale_factor=pipe.vae_scale_factor)
    if family.name == "pixart":
        from worker.backends.pixart import PixArtBackend

        vae = prepare_vae(pipe.vae)
        cfg = pipe.transformer.config
        size = int(size or cfg.sample_size * pipe.vae_scale_factor)
        length = int(meta.get("max_sequence_length") or call_default(pipe, "max_sequence_length", 120))
        shift, scale = latent_transform(vae)
        return PixArtBackend(**common, schedule=ddpm_schedule(pipe.scheduler.config, spec, device),
                             denoiser=place(pipe.transformer, device), vae=vae,
                             tokenizer=_prompt_tokenizer(pipe, ("tokenizer",), length), image_size=size,
                             latent_shift=shift, latent_scale=scale, max_sequence_length=length,
                             micro_conditions=type(pipe).__name__ == "PixArtAlphaPipeline" and cfg.sample_size == 128,
                             latent_channels=int(cfg.in_channels))
    if family.name == "deepfloyd-if":
        from worker.backends.deepfloyd import DeepFloydBackend

        unet = pipe.unet
        return DeepFloydBackend(**common, schedule=ddpm_schedule(pipe.scheduler.config, spec, device),
                                denoiser=place(unet, device, channels_last=True), vae=None,
                                tokenizer=_prompt_tokenizer(pipe, ("tokenizer",), 77),
                                image_size=int(size or unet.config.sample_size), channels=int(unet.config.in_channels))
    raise ModelNotFoundError(f"model {spec!r}: no adapter for family {family.name!r}")


def _prompt_tokenizer(pipe: Any, names: tuple[str, ...], length: int) -> Any:
    """The tokenizer whose ``length``-token truncation decides what the model reads."""
    for name in names:
        tok = getattr(pipe, name, None)
        if tok is not None:
            if name != "tokenizer" or "T5" in type(tok).__name__:
                tok.model_max_length = length
            return tok
    return pipe.tokenizer


# --------------------------------------------------------------------------- single files

#: Pipeline class per family for diffusers' from_single_file.
_SINGLE_FILE_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                          "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


class _LazyCheckpoint(dict):
    """A safetensors file's tensors by name, read only when looked at (a 24 GB file's
    type is told from a few keys and shapes)."""

    def __init__(self, handle: Any):
        super().__init__((k, None) for k in handle.keys())
        self._handle = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


def single_file_family(path: Path, spec: str) -> tuple[Family, str]:
    """(family, diffusers model type) of a single .safetensors checkpoint."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise ModelNotFoundError(f"model file {spec} is not a .safetensors checkpoint: difflabel reads single-file "
                                 "models as .safetensors only (or pass a diffusers folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            ckpt = _LazyCheckpoint(f)
            kind = infer_diffusers_model_type(ckpt)
            if kind == "v1" and CHECKPOINT_KEY_NAMES["v1"] not in ckpt:  # diffusers' fallback guess
                kind = None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises many types
        raise ModelNotFoundError(f"model file {spec} is not a readable .safetensors checkpoint "
                                 f"({type(e).__name__}): check the file or download it again") from e
    if kind is None:
        raise ModelNotFoundError(f"model file {spec} is not a checkpoint of a known diffusion model "
                                 "(no Stable Diffusion, SDXL, SD3 or FLUX.1 weights in it)")
    if kind not in SINGLE_FILE_TYPES:
        raise UsageError(f"model file {spec} is a {kind!r} checkpoint, which difflabel cannot load as a single file: "
                         "`difflabel models` lists the supported families (pass a diffusers folder)")
    return by_name(SINGLE_FILE_TYPES[kind]), kind


def load_single_file(family: Family, kind: str, path: Path, spec: str, dtype: torch.dtype) -> Any:
    """The pipeline of a single-file checkpoint (diffusers' from_single_file, which reads the
    family's configuration, and any weights the file lacks, from the hub or its cache)."""
    import diffusers
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    cls = getattr(diffusers, _SINGLE_FILE_PIPELINES[family.name])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if family.name == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - hub, config and weight errors come in many types
        repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {}).get("pretrained_model_name_or_path", "its base model")
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise ModelNotFoundError(
            f"could not load {spec} as a {family.title} single file ({first}): it needs the configuration "
            f"and any missing components of {repo} from the hub or its cache, or save the pipeline as a folder"
        ) from e

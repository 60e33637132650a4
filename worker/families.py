"""The text-to-image model families difflabel scores with, read from a model's files.

A diffusers model folder names its pipeline in ``model_index.json`` (``_class_name``); that
name picks the adapter (``worker.backends``). This module holds the facts per family that
the loader, the hub download and ``difflabel models`` share, without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ModelNotFoundError, UsageError

#: Files of a hub snapshot every family reads (no safety checker, no feature extractor,
#: no fp16 duplicates: one copy of each weight, sharded or not).
_COMMON_PATTERNS = ("model_index.json", "scheduler/*")


def _weights(folder: str, stem: str) -> tuple[str, ...]:
    """Hub patterns for one component: its config and its full-precision weights."""
    return (f"{folder}/*.json", f"{folder}/{stem}.safetensors", f"{folder}/{stem}-*-of-*.safetensors")


def _tokenizer(folder: str) -> tuple[str, ...]:
    return (f"{folder}/*",)


@dataclass(frozen=True)
class Family:
    """One model family: the pipelines it covers and what scoring with it involves."""

    name: str
    title: str
    #: ``_class_name`` values in model_index.json.
    pipelines: tuple[str, ...]
    #: What the loader loads and how the class prompt becomes conditioning.
    loads: str
    #: The model's native resolution and latent space.
    resolution: str
    #: Prediction target and noise schedule.
    target: str
    #: Hub repositories of this family (examples).
    examples: tuple[str, ...]
    #: Files of a hub snapshot the loader needs.
    hub_patterns: tuple[str, ...]
    #: The tokenizer subfolder whose truncation decides when two prompts read the same.
    prompt_tokenizer: str = "tokenizer"
    #: Default compute dtype on CUDA.
    cuda_dtype: str = "bfloat16"
    #: diffusers' from_single_file can load a single .safetensors checkpoint of it.
    single_file: bool = False


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd", "Stable Diffusion 1.x / 2.x", ("StableDiffusionPipeline",),
        "UNet + CLIP text encoder (last hidden state, 77 tokens) + VAE",
        "512 (2.1: 768); 4-channel latent x 0.18215",
        "epsilon or v (scheduler config); DDPM scaled-linear, 1000 steps",
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1-base"),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _weights("text_encoder", "model")
        + _weights("unet", "diffusion_pytorch_model") + _weights("vae", "diffusion_pytorch_model"),
        cuda_dtype="float16", single_file=True,
    ),
    Family(
        "sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",),
        "UNet + CLIP-L and OpenCLIP-bigG (penultimate layers concatenated; pooled embedding and "
        "size/crop time_ids) + VAE (fp32: it overflows in fp16)",
        "1024; 4-channel latent x 0.13025",
        "epsilon (or v); DDPM scaled-linear, 1000 steps",
        ("stabilityai/stable-diffusion-xl-base-1.0",),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _tokenizer("tokenizer_2")
        + _weights("text_encoder", "model") + _weights("text_encoder_2", "model")
        + _weights("unet", "diffusion_pytorch_model") + _weights("vae", "diffusion_pytorch_model"),
        cuda_dtype="float16", single_file=True,
    ),
    Family(
        "sd3", "Stable Diffusion 3 / 3.5", ("StableDiffusion3Pipeline",),
        "MMDiT + CLIP-L, OpenCLIP-bigG and T5-XXL (T5 optional: zeros without it; pooled "
        "projections) + 16-channel VAE",
        "1024; 16-channel latent, (z - 0.0609) x 1.5305",
        "flow matching (velocity), shifted sigmas (shift 3)",
        ("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-medium",
         "stabilityai/stable-diffusion-3.5-large"),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _tokenizer("tokenizer_2") + _tokenizer("tokenizer_3")
        + _weights("text_encoder", "model") + _weights("text_encoder_2", "model")
        + _weights("text_encoder_3", "model") + _weights("transformer", "diffusion_pytorch_model")
        + _weights("vae", "diffusion_pytorch_model"),
        prompt_tokenizer="tokenizer_3", single_file=True,
    ),
    Family(
        "flux", "FLUX.1 dev / schnell", ("FluxPipeline",),
        "Flux transformer + CLIP-L (pooled) and T5-XXL (512 tokens dev, 256 schnell); packed "
        "latents with image and text ids; guidance embedding fixed at 1.0 for every class + VAE",
        "1024; 16-channel latent, (z - 0.1159) x 0.3611, packed 2x2",
        "flow matching (velocity), resolution-dependent (dynamic) shift",
        ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _tokenizer("tokenizer_2")
        + _weights("text_encoder", "model") + _weights("text_encoder_2", "model")
        + _weights("transformer", "diffusion_pytorch_model") + _weights("vae", "diffusion_pytorch_model"),
        prompt_tokenizer="tokenizer_2", single_file=True,
    ),
    Family(
        "pixart", "PixArt-alpha / PixArt-Sigma", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        "DiT + T5-XXL with its attention mask (120 tokens alpha, 300 Sigma) + VAE",
        "1024 (or the checkpoint's 512/256); 4-channel latent",
        "epsilon (first half of the output channels when sigma is learned); DDPM linear, 1000 steps",
        ("PixArt-alpha/PixArt-XL-2-1024-MS", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _weights("text_encoder", "model")
        + _weights("transformer", "diffusion_pytorch_model") + _weights("vae", "diffusion_pytorch_model"),
    ),
    Family(
        "deepfloyd-if", "DeepFloyd IF stage I", ("IFPipeline",),
        "pixel-space UNet conditioned on T5-XXL (77 tokens); no VAE",
        "64 x 64 RGB pixels in [-1, 1]",
        "epsilon in the first 3 of 6 output channels (variance learned); cosine schedule, 1000 steps",
        ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-I-M-v1.0"),
        _COMMON_PATTERNS + _tokenizer("tokenizer") + _weights("text_encoder", "model")
        + _weights("unet", "diffusion_pytorch_model"),
    ),
)

#: Pipelines that are diffusion models but no text-to-image family difflabel scores with,
#: by the start of their ``_class_name``, and why.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("Kandinsky", "Kandinsky (conditioned on a prior's image embedding, not on the prompt)"),
    ("StableVideoDiffusion", "Stable Video Diffusion (a video model)"),
    ("TextToVideo", "a text-to-video model"),
    ("VideoToVideo", "a video model"),
    ("AnimateDiff", "AnimateDiff (a video model)"),
    ("CogVideoX", "CogVideoX (a video model)"),
    ("HunyuanVideo", "HunyuanVideo (a video model)"),
    ("LTX", "LTX-Video (a video model)"),
    ("Mochi", "Mochi (a video model)"),
    ("Wan", "Wan (a video model)"),
    ("Latte", "Latte (a video model)"),
    ("Allegro", "Allegro (a video model)"),
    ("IFSuperResolution", "DeepFloyd IF stage II/III (a super-resolution model: use stage I)"),
    ("IFImg2Img", "DeepFloyd IF image-to-image (use the stage I text-to-image pipeline)"),
    ("IFInpainting", "DeepFloyd IF inpainting (use the stage I text-to-image pipeline)"),
    ("StableDiffusionUpscale", "the Stable Diffusion upscaler (a super-resolution model)"),
    ("StableDiffusionXLImg2Img", "the SDXL refiner / image-to-image pipeline (use the base model)"),
    ("StableDiffusionXLInpaint", "SDXL inpainting (use the base model)"),
    ("StableDiffusionInpaint", "Stable Diffusion inpainting (use a text-to-image checkpoint)"),
    ("StableCascade", "Stable Cascade (a two-stage prior/decoder model)"),
    ("Wuerstchen", "Wuerstchen (a two-stage prior/decoder model)"),
    ("UnCLIP", "unCLIP (conditioned on an image embedding)"),
    ("Flux2", "FLUX.2 (a different architecture from FLUX.1)"),
    ("FluxFill", "FLUX.1 Fill (an inpainting model)"),
    ("FluxControl", "FLUX.1 control models (need a control image)"),
    ("FluxKontext", "FLUX.1 Kontext (an image-editing model)"),
)

#: Single-file checkpoint types (diffusers' ``infer_diffusers_model_type``) and their family.
SINGLE_FILE_TYPES = {
    "v1": "sd", "v2": "sd", "xl_base": "sdxl", "sd3": "sd3", "sd35_medium": "sd3", "sd35_large": "sd3",
    "flux-dev": "flux", "flux-schnell": "flux",
}


def by_name(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(name)


def supported_names() -> str:
    return ", ".join(f.title for f in FAMILIES)


def family_for_pipeline(class_name: str, spec: str) -> Family:
    """The family of a ``model_index.json`` ``_class_name``; one-line UsageError otherwise."""
    for f in FAMILIES:
        if class_name in f.pipelines:
            return f
    for prefix, what in UNSUPPORTED:
        if class_name.startswith(prefix):
            raise UsageError(f"model {spec!r} is {what} ({class_name}), which difflabel cannot score with: "
                             "`difflabel models` lists the supported families")
    raise UsageError(f"model {spec!r} is a {class_name}, not a text-to-image family difflabel supports "
                     f"({supported_names()}): `difflabel models` lists them")


def pipeline_class_name(model_dir: Path) -> str | None:
    """``_class_name`` of a diffusers folder's model_index.json; None when it has none."""
    index = model_dir / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except ValueError as e:
        raise ModelNotFoundError(f"{index} is not valid JSON ({e}): download the model again") from e
    name = data.get("_class_name") if isinstance(data, dict) else None
    return str(name) if name else None


def describe() -> list[dict]:
    """One row per family, for ``difflabel models``."""
    return [{"family": f.name, "title": f.title, "pipelines": list(f.pipelines), "loads": f.loads,
             "resolution": f.resolution, "target": f.target, "examples": list(f.examples),
             "single_file": f.single_file} for f in FAMILIES]

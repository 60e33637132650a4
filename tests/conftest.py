"""Shared fixtures: tiny diffusion models built from config on disk, no downloads.

Two model families, each in the layout ``worker.backends.load_backend`` reads:

* pixel: ``worker.training`` builds a word-level tokenizer, a 3-channel 8x8
  ``UNet2DConditionModel`` and a one-layer CLIP text encoder, saved with ``difflabel.json``;
* latent (Stable-Diffusion style): a tiny ``AutoencoderKL`` (32x32 pixels -> 4x16x16
  latents), a 16x16 UNet, a CLIP text encoder, a real ``CLIPTokenizer`` built from a
  vocab.json + merges.txt written here, a PNDM scheduler config and a
  ``model_index.json`` listing "vae" (no ``difflabel.json``, as on the hub).

Weights are random but seeded, so every run builds the same models. Builders are
cached per session; loaded backends too (tests only read them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Gentle on a 2-core machine that may be training a model in the background.
torch.set_num_threads(1)

#: Words every tiny model's tokenizer knows (prompts in the tests use them).
WORDS = ("a photo of the cat dog bird fish car digit zero one two three").split()
#: Template stored in the tiny models' metadata.
TINY_TEMPLATE = "a photo of a {}"
#: Sequence length of the tiny text encoders.
MAX_TOKENS = 8
#: Width of the tiny text encoders (= the UNets' cross-attention dim).
TEXT_WIDTH = 16


# --------------------------------------------------------------------------- pixel


def _build_pixel_model(out: Path, prediction_type: str, channels: int) -> Path:
    from diffusers import DDPMScheduler

    from worker.training import PixelModelConfig, build_model, build_tokenizer, save

    torch.manual_seed(0)
    cfg = PixelModelConfig(
        image_size=8, channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        attention_head_dim=4, norm_num_groups=4, text_width=TEXT_WIDTH, text_layers=1,
        text_heads=2, max_tokens=MAX_TOKENS,
    )
    tokenizer = build_tokenizer(WORDS, cfg.max_tokens)
    unet, text_encoder, scheduler = build_model(cfg, len(tokenizer))
    if prediction_type != scheduler.config.prediction_type:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    save(out, cfg, tokenizer, unet, text_encoder, scheduler, {"default_template": TINY_TEMPLATE})
    return out


@pytest.fixture(scope="session")
def make_pixel_model(tmp_path_factory) -> Callable[..., Path]:
    """``make_pixel_model(prediction_type="epsilon", channels=3)`` -> model directory (cached)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(prediction_type: str = "epsilon", channels: int = 3) -> Path:
        key = (prediction_type, channels)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"pixel-{prediction_type}-{channels}ch")
            cache[key] = _build_pixel_model(out, prediction_type, channels)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_pixel_model(make_pixel_model) -> Path:
    """An epsilon-prediction 3-channel 8x8 pixel model directory."""
    return make_pixel_model("epsilon", 3)


# --------------------------------------------------------------------------- latent


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_clip_vocab(out: Path) -> Path:
    """A minimal byte-level BPE vocabulary: every byte (+ ``</w>``), a few merges, specials."""
    out.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("o", "f</w>"),
              ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return out


def _build_sd_model(out: Path, prediction_type: str) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # transformers 5: CLIPTokenizer(vocab_file=...) silently builds a broken tokenizer;
    # from_pretrained(dir) reads vocab.json + merges.txt properly.
    tokenizer = CLIPTokenizer.from_pretrained(_write_clip_vocab(out.parent / f"{out.name}-rawtok"))
    tokenizer.model_max_length = MAX_TOKENS
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=4,
    )
    # SD 1.x ships a PNDM scheduler config; the loader reads its schedule through DDPM.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
    }, indent=2) + "\n")
    return out


@pytest.fixture(scope="session")
def make_sd_model(tmp_path_factory) -> Callable[[str], Path]:
    """``make_sd_model(prediction_type)`` -> a tiny SD-style model directory (cached)."""
    cache: dict[str, Path] = {}

    def make(prediction_type: str = "epsilon") -> Path:
        if prediction_type not in cache:
            cache[prediction_type] = _build_sd_model(
                tmp_path_factory.mktemp(f"sd-{prediction_type}"), prediction_type)
        return cache[prediction_type]

    return make


@pytest.fixture(scope="session")
def tiny_sd_model(make_sd_model) -> Path:
    """An epsilon-prediction tiny SD-style latent model directory."""
    return make_sd_model("epsilon")


# --------------------------------------------------------------------------- backends


@pytest.fixture(scope="session")
def load_tiny(make_pixel_model, make_sd_model) -> Callable[[str, str], object]:
    """``load_tiny(family, prediction_type)`` -> a loaded CPU backend (cached per session)."""
    from worker.backends import load_backend

    cache: dict[tuple[str, str], object] = {}

    def load(family: str, prediction_type: str = "epsilon"):
        key = (family, prediction_type)
        if key not in cache:
            if family == "pixel":
                path = make_pixel_model(prediction_type, 3)
            elif family == "latent":
                path = make_sd_model(prediction_type)
            else:
                raise ValueError(family)
            cache[key] = load_backend(str(path), device="cpu")
        return cache[key]

    return load


@pytest.fixture(scope="session")
def pixel_backend(load_tiny):
    return load_tiny("pixel", "epsilon")


@pytest.fixture(scope="session")
def sd_backend(load_tiny):
    return load_tiny("latent", "epsilon")

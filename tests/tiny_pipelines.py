"""Tiny random text-to-image pipelines of every family, built from config and saved with the
pipeline's own ``save_pretrained`` (model_index.json and one folder per component).

No downloads: the CLIP tokenizers come from a byte-level vocabulary written here and the
T5 tokenizers from a small unigram vocabulary (transformers 5 builds both on the
``tokenizers`` library); each is saved and read back with ``from_pretrained(dir)``, as a
hub tokenizer is. Weights are random but seeded: the same folder every run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

#: Words the tiny tokenizers know as whole tokens.
WORDS = "a photo of the cat dog bird fish car red green blue".split()
#: CLIP tokens per prompt (the real models use 77).
CLIP_TOKENS = 8
#: Width of the tiny CLIP and T5 encoders.
CLIP_WIDTH = 16
T5_WIDTH = 32
TEMPLATE = "a photo of a {}"


# --------------------------------------------------------------------------- tokenizers


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def clip_tokenizer(root: Path, name: str = "clip-tok"):
    """A CLIP BPE tokenizer over bytes with whole-word merges for ``WORDS``."""
    from transformers import CLIPTokenizer

    raw = root / f"{name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (raw / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # transformers 5: CLIPTokenizer(vocab_file=...) silently builds a broken tokenizer.
    tok = CLIPTokenizer.from_pretrained(raw)
    tok.model_max_length = CLIP_TOKENS
    return tok


def t5_tokenizer(root: Path, name: str = "t5-tok"):
    """A T5 unigram tokenizer (pad 0, eos 1, unk 2) whose pieces are ``WORDS``."""
    from transformers import T5Tokenizer, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    out = root / name
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(out)
    return T5TokenizerFast.from_pretrained(out)


# --------------------------------------------------------------------------- components


def clip_encoder(tok, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS,
                         projection_dim=CLIP_WIDTH, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_encoder(tok, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def vae(latent_channels: int = 4, **kw):
    """A 2-level AutoencoderKL: 2x downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **kw)


# --------------------------------------------------------------------------- pipelines


def sdxl(root: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = clip_tokenizer(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        cross_attention_dim=2 * CLIP_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + CLIP_WIDTH, transformer_layers_per_block=(1, 1))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025, force_upcast=True), text_encoder=clip_encoder(tok, seed=1),
        text_encoder_2=clip_encoder(tok, projection=True, seed=2), tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=sched, add_watermarker=False)


def sd3(root: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip, t5 = clip_tokenizer(root), t5_tokenizer(root)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=clip_encoder(clip, True, seed=1),
        tokenizer=clip, text_encoder_2=clip_encoder(clip, True, seed=2), tokenizer_2=clip,
        text_encoder_3=t5_encoder(t5, seed=3), tokenizer_3=t5)


def flux(root: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip, t5 = clip_tokenizer(root), t5_tokenizer(root)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=sched, vae=vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=clip_encoder(clip, seed=1),
        tokenizer=clip, text_encoder_2=t5_encoder(t5, seed=2), tokenizer_2=t5, transformer=transformer)


def pixart(root: Path):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    t5 = t5_tokenizer(root)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=T5_WIDTH, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtAlphaPipeline(tokenizer=t5, text_encoder=t5_encoder(t5, seed=1), vae=vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def deepfloyd(root: Path):
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    t5 = t5_tokenizer(root)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32,
        encoder_hid_dim=T5_WIDTH, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                          thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                          prediction_type="epsilon")
    return IFPipeline(tokenizer=t5, text_encoder=t5_encoder(t5, seed=1), unet=unet, scheduler=sched,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


BUILDERS: dict[str, Callable[[Path], object]] = {
    "sdxl": sdxl, "sd3": sd3, "flux": flux, "pixart": pixart, "deepfloyd-if": deepfloyd,
}
#: difflabel.json beside the pipeline: FLUX's native 1024 pixels (128 latent x 8) would be
#: a 256-pixel image for the tiny 2x VAE; 32 keeps its token count small.
META = {"flux": {"image_size": 32}}


def save(family: str, out: Path) -> Path:
    """Build the family's tiny pipeline and save it as a pipeline folder in ``out``."""
    pipe = BUILDERS[family](out.parent / f"{out.name}-tokenizers")
    pipe.save_pretrained(out, safe_serialization=True)
    meta = {"default_template": TEMPLATE, **META.get(family, {})}
    (out / "difflabel.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out

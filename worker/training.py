"""Train a small pixel-space text-to-image diffusion model and save it in diffusers layout.

The model's shape is a frozen dataclass saved with the weights (nanoGPT's habit); the
training loop is plain PyTorch: AdamW with a one-cycle learning rate and prompt dropout,
on one of two objectives (``PixelModelConfig.objective``):

* ``epsilon``: DDPM epsilon prediction on a linear beta schedule over 1,000 steps;
* ``flow``: flow matching (Lipman et al. 2023; Esser et al. 2024): x_t = (1 - sigma) x0 +
  sigma eps, the model predicts v = eps - x0 from (x_t, sigma * 1000), sigma taken from a
  ``FlowMatchEulerDiscreteScheduler`` grid of 1,000 steps, which the model folder ships so
  that difflabel scores it as a flow model (on the same grid).

Everything is seeded, so the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

#: Tokens every word-level vocabulary starts with.
SPECIAL_TOKENS = ("[PAD]", "[UNK]")
#: Training objectives: DDPM epsilon prediction, or flow matching (velocity prediction).
OBJECTIVES = ("epsilon", "flow")
#: How a flow model's training draws sigma: a uniform index into the scheduler's grid (the
#: distribution difflabel's scorer draws from), or the logit-normal of SD3's training
#: (Esser et al. 2024, section 3.1), mapped onto the same grid as diffusers' scripts do.
SIGMA_SAMPLINGS = ("uniform", "logit-normal")


@dataclass(frozen=True)
class PixelModelConfig:
    image_size: int = 8
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_tokens: int = 12
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    objective: str = "epsilon"
    #: Flow models: the FlowMatchEulerDiscreteScheduler ``shift`` (1: the plain grid i / T).
    flow_shift: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    prompt_dropout: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: torch's default
    #: Flow models only: "uniform" or "logit-normal" (SIGMA_SAMPLINGS).
    sigma_sampling: str = "uniform"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final_loss(self, window: int = 200) -> float:
        tail = self.losses[-window:]
        return sum(tail) / max(len(tail), 1)


def build_tokenizer(words: Sequence[str], max_tokens: int):
    """A word-level fast tokenizer (lower-cased, punctuation split off)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        w = w.lower()
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   model_max_length=max_tokens)


def build_model(cfg: PixelModelConfig, vocab_size: int):
    """(unet, text_encoder, scheduler) with random weights from ``cfg``."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}: use one of {', '.join(OBJECTIVES)}")
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    ))
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    if cfg.objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                                    shift=cfg.flow_shift)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                  beta_schedule=cfg.beta_schedule, prediction_type="epsilon")
    return unet, text_encoder, scheduler


def flow_training_sigmas(scheduler, image_seq_len: int) -> torch.Tensor:
    """(T,) ascending: the sigma grid difflabel scores a flow model on (worker.backends.pipeline)."""
    from worker.backends.pipeline import flow_sigmas

    return flow_sigmas(scheduler.config, image_seq_len)


def draw_sigma_index(n: int, T: int, sampling: str, g: torch.Generator) -> torch.Tensor:
    """n indices into a grid of T ascending sigmas: uniform, or logit-normal (u = sigmoid(z),
    z ~ N(0, 1); index floor(u T), as diffusers' ``compute_density_for_timestep_sampling``)."""
    if sampling == "uniform":
        return torch.randint(0, T, (n,), generator=g)
    if sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=g))
        return (u * T).long().clamp_(0, T - 1)
    raise ValueError(f"unknown sigma sampling {sampling!r}: use one of {', '.join(SIGMA_SAMPLINGS)}")


def train(images: torch.Tensor, captions: Callable[[int, torch.Generator], str], cfg: PixelModelConfig,
          tcfg: TrainConfig, tokenizer, unet, text_encoder, scheduler,
          progress: Callable[[int, float], None] | None = None,
          augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> TrainResult:
    """Train in place. images (N, C, S, S) in [-1, 1]; ``captions(i, g)`` draws a caption for image i;
    ``augment(x0, g)``, if given, transforms each batch of images (same shape, same range)."""
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    g = torch.Generator().manual_seed(tcfg.seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg.lr, total_steps=tcfg.steps)
    flow = cfg.objective == "flow"
    if flow:
        sigmas = flow_training_sigmas(scheduler, cfg.image_size * cfg.image_size)
        T = int(sigmas.shape[0])
    else:
        abar = scheduler.alphas_cumprod.float()
    unet.train()
    text_encoder.train()
    result = TrainResult()
    start = time.perf_counter()
    n = images.shape[0]
    for step in range(tcfg.steps):
        idx = torch.randint(0, n, (tcfg.batch_size,), generator=g)
        texts = ["" if torch.rand((), generator=g).item() < tcfg.prompt_dropout else captions(int(i), g)
                 for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=cfg.max_tokens, truncation=True,
                        return_tensors="pt").input_ids
        x0 = images[idx]  # (B, C, S, S)
        if augment is not None:
            x0 = augment(x0, g)
        if flow:
            i = draw_sigma_index(tcfg.batch_size, T, tcfg.sigma_sampling, g)
            eps = torch.randn(x0.shape, generator=g)
            s = sigmas[i].view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * eps
            # The scheduler's timestep is sigma * T (what SD3's pipeline passes its MMDiT).
            timestep, target = sigmas[i] * T, eps - x0
        else:
            timestep = torch.randint(0, cfg.num_train_timesteps, (tcfg.batch_size,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = abar[timestep].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            target = eps
        cond = text_encoder(ids)[0]  # (B, L, D)
        loss = F.mse_loss(unet(x_t, timestep, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        if progress:
            progress(step, float(loss))
        if not math.isfinite(result.losses[-1]):
            raise FloatingPointError(f"training diverged at step {step}")
    result.seconds = time.perf_counter() - start
    unet.eval()
    text_encoder.eval()
    return result


def training_facts(tcfg: TrainConfig, result: TrainResult, unet, text_encoder) -> dict:
    """What a model card records about any training run: settings, loss, time, machine, size."""
    import platform

    return {
        **vars(tcfg),
        "final_loss": round(result.final_loss(), 5),
        "seconds": round(result.seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
    }


def save(out_dir: Path, cfg: PixelModelConfig, tokenizer, unet, text_encoder, scheduler,
         meta: dict) -> None:
    """diffusers layout plus ``difflabel.json`` (family, image size, config, training facts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    scheduler.save_pretrained(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "DifflabelPixelPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }, indent=2) + "\n")
    info = {"family": "pixel", "image_size": cfg.image_size, "channels": cfg.channels,
            "config": dataclasses.asdict(cfg), **meta}
    (out_dir / "difflabel.json").write_text(json.dumps(info, indent=2) + "\n")

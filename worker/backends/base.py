"""The model-family interface the scorer needs, and what every family shares.

Following k-diffusion's habit: the scorer talks to one small protocol, and each
outside model family gets one thin adapter. A ``Backend`` bundles

* a ``Denoiser``: the single method ``predict(x_t, t, cond)`` returning the model's raw
  output (epsilon, v or x0, as ``schedule.prediction_type`` says);
* ``encode_prompts``: class prompts to conditioning tensors, once per label set;
* ``encode_images``: PIL images to x0 (pixels in [-1, 1], or VAE latents), once per item.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from worker.batching import BatchSizer

#: Prediction targets of the variance-preserving (DDPM) families; flow-matching models
#: predict the velocity eps - x0 ("flow").
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW = "flow"

#: Prompts per text-encoder call.
PROMPT_BATCH = 256


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete training schedule of T steps, indexed by t in [0, T).

    Variance-preserving (DDPM) models: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with
    ``alphas_cumprod`` (T,). Flow-matching models (``prediction_type`` "flow"): x_t =
    (1 - sigma_t) x0 + sigma_t eps, with ``sigmas`` (T,) ascending, already shifted as the
    model's scheduler shifts them; the model predicts the velocity v = eps - x0.
    """

    alphas_cumprod: torch.Tensor | None  # (T,) float32, on the backend's device; None for flow
    prediction_type: str = "epsilon"
    sigmas: torch.Tensor | None = None  # (T,) float32 ascending, flow models only

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == FLOW

    @property
    def num_timesteps(self) -> int:
        table = self.sigmas if self.is_flow else self.alphas_cumprod
        return int(table.shape[0])


class Cond:
    """Class conditioning made of several tensors, each with the class as its first dim.

    Families that need more than one tensor per prompt (SDXL's pooled embedding, PixArt's
    attention mask...) return one of these from ``encode_prompts``; it indexes like the
    (K, L, D) tensor of a single-encoder model, so the scorer treats both alike.
    """

    def __init__(self, **parts: torch.Tensor):
        if not parts:
            raise ValueError("Cond needs at least one tensor")
        self.parts = parts

    def __getattr__(self, name: str) -> torch.Tensor:
        parts = self.__dict__.get("parts")
        if parts is None or name not in parts:
            raise AttributeError(name)
        return parts[name]

    def __getitem__(self, index) -> Cond:
        return Cond(**{k: v[index] for k, v in self.parts.items()})

    def __len__(self) -> int:
        return int(self._main.shape[0])

    @property
    def _main(self) -> torch.Tensor:
        return next(iter(self.parts.values()))

    @property
    def shape(self) -> torch.Size:
        """Shape of the main tensor (the token embeddings)."""
        return self._main.shape

    @property
    def device(self) -> torch.device:
        return self._main.device

    def to(self, *args, **kwargs) -> Cond:
        return Cond(**{k: v.to(*args, **kwargs) for k, v in self.parts.items()})

    @staticmethod
    def cat(parts: list[Cond]) -> Cond:
        return Cond(**{k: torch.cat([p.parts[k] for p in parts]) for k in parts[0].parts})


class Denoiser(Protocol):
    schedule: NoiseSchedule

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Cond) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,) int64 schedule indices, cond (B, L, D) or a ``Cond`` of B
        rows -> raw model output (B, C, H, W): eps, v or x0 for DDPM models as
        ``schedule.prediction_type`` says, the velocity eps - x0 for flow models."""
        ...


@dataclass
class Backend(ABC):
    """A loaded text-to-image diffusion model ready to score images."""

    name: str
    device: torch.device
    dtype: torch.dtype
    schedule: NoiseSchedule
    #: Template the model was trained with, used when the user gives none.
    default_template: str | None = None
    #: Mapping from classifier signals to probability, fitted by ``difflabel calibrate``.
    calibration: dict[str, Any] | None = None
    #: Where the model was loaded from (a directory), if anywhere.
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Rows per model call this device takes; lowered on out-of-memory and kept.
    batch_sizer: BatchSizer = field(default_factory=BatchSizer)

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Cond) -> torch.Tensor: ...

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | Cond:
        """K prompts -> conditioning (K, L, D), or a ``Cond`` of K rows, on ``device``."""

    @abstractmethod
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """N images -> x0 (N, C, H, W) float32 on ``device``."""


@dataclass
class TextUNetBackend(Backend):
    """A ``UNet2DConditionModel`` conditioned on a transformers text encoder's hidden states."""

    unet: Any = None
    text_encoder: Any = None
    tokenizer: Any = None

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.schedule.is_flow:  # the scheduler's timestep: sigma * T, as SD3's pipeline passes it
            t = self.schedule.sigmas[t] * self.schedule.num_timesteps
        return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(K, L, D), encoded PROMPT_BATCH prompts at a time (thousands of labels fit)."""
        parts = []
        for s in range(0, len(prompts), PROMPT_BATCH):
            tokens = self.tokenizer(
                prompts[s : s + PROMPT_BATCH],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(self.device)
            parts.append(self.text_encoder(ids)[0].to(self.dtype))
        return torch.cat(parts)


def pil_to_tensor(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``size``, scale to [-1, 1]: (C, size, size)."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = data.view(size, size, channels).permute(2, 0, 1).float()
    return x / 127.5 - 1.0

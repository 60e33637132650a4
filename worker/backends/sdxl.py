"""Stable Diffusion XL: two CLIP text encoders, a UNet with pooled-text and size conditioning.

Conditioning (``StableDiffusionXLPipeline.encode_prompt``, no CFG): the penultimate hidden
states of CLIP-L and OpenCLIP-bigG concatenated (77 x 2048), and bigG's pooled projection
(1280). The UNet also reads ``time_ids`` = (original size, crop top-left, target size):
here the native size, no crop, for every image and class, as the pipeline's defaults.
The SDXL VAE overflows in fp16 (``force_upcast``): it encodes in fp32, as every family's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.backends.base import Cond
from worker.backends.pipeline import PipelineBackend


@dataclass
class SDXLBackend(PipelineBackend):
    time_ids: Any = None  # (1, 6)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Cond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))  # (K, 77, 2048), (K, 1280)

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x_t.shape[0]
        added = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": self.time_ids.expand(b, -1)}
        return self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond.embeds.to(self.dtype),
                             added_cond_kwargs=added).sample


def time_ids(pipe: Any, size: int, pooled_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pipeline's own add_time_ids for a size x size image, no crop: (1, 6)."""
    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=dtype,
                                 text_encoder_projection_dim=pooled_dim)
    return ids.to(device)

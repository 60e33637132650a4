"""PixArt-alpha / PixArt-Sigma: a DiT conditioned on T5-XXL, with T5's attention mask.

Conditioning (``encode_prompt`` of the PixArt pipelines, no CFG, no caption cleaning):
T5's last hidden states over ``max_sequence_length`` tokens (120 alpha, 300 Sigma) and
the attention mask, which the transformer receives as ``encoder_attention_mask``. The
1024-pixel alpha models also read the image's resolution and aspect ratio. With a learned
sigma the output has twice the latent's channels: the first half is epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.backends.base import Cond
from worker.backends.pipeline import PipelineBackend


@dataclass
class PixArtBackend(PipelineBackend):
    max_sequence_length: int = 120
    #: The alpha pipeline's micro-conditions at sample_size 128: resolution and aspect ratio.
    micro_conditions: bool = False
    latent_channels: int = 4
    _added: Any = None

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, num_images_per_prompt=1, device=self.device,
            clean_caption=False, max_sequence_length=self.max_sequence_length)
        return Cond(embeds=embeds.to(self.dtype), mask=mask)  # (K, L, 4096), (K, L)

    def added_cond_kwargs(self, b: int) -> dict:
        if not self.micro_conditions:
            return {"resolution": None, "aspect_ratio": None}
        s = float(self.image_size)
        return {"resolution": torch.tensor([[s, s]], device=self.device, dtype=self.dtype).expand(b, -1),
                "aspect_ratio": torch.tensor([[1.0]], device=self.device, dtype=self.dtype).expand(b, -1)}

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.denoiser(x_t.to(self.dtype), encoder_hidden_states=cond.embeds.to(self.dtype),
                            encoder_attention_mask=cond.mask, timestep=t,
                            added_cond_kwargs=self.added_cond_kwargs(x_t.shape[0])).sample
        if out.shape[1] == 2 * self.latent_channels:  # learned sigma: (eps, variance)
            out = out[:, : self.latent_channels]
        return out

"""FLUX.1 dev / schnell: a rectified-flow transformer on packed 16-channel latents.

Conditioning (``FluxPipeline.encode_prompt``): CLIP-L's pooled output (768) and T5-XXL's
last hidden states (512 tokens for dev, 256 for schnell), with text ids all zero. The
latent (C, H, W) is packed into (H/2 * W/2) tokens of 4C channels with image ids
(0, row, col), exactly as the pipeline packs it; the velocity comes back unpacked, so the
scorer's errors are those of the (C, H, W) latent (the squared error ignores order).
FLUX.1-dev is guidance-distilled: its guidance embedding is held at ``guidance`` (1.0 by
default: the plain conditional prediction) for every class. The timestep passed is sigma
(the model multiplies by 1000), on the scheduler's resolution-dependent shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.backends.base import Cond
from worker.backends.pipeline import PipelineBackend

#: Guidance embedding value for guidance-distilled FLUX.1-dev: 1.0 asks for the conditional
#: prediction without the distilled classifier-free guidance (the pipeline samples at 3.5).
DEFAULT_GUIDANCE = 1.0


@dataclass
class FluxBackend(PipelineBackend):
    max_sequence_length: int = 512
    guidance: float | None = DEFAULT_GUIDANCE  # None: the model has no guidance embedding
    vae_scale_factor: int = 8
    _img_ids: Any = None

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(  # the third, text ids, is all zeros
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return Cond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    def img_ids(self, h: int, w: int) -> torch.Tensor:
        if self._img_ids is None or self._img_ids[0] != (h, w):
            ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
            self._img_ids = ((h, w), ids)
        return self._img_ids[1]

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, h, w = x_t.shape
        packed = self.pipe._pack_latents(x_t.to(self.dtype), b, c, h, w)  # (B, h/2 * w/2, 4C)
        # As the pipeline: its float timesteps (sigma * 1000) in the model's dtype, over 1000.
        timestep = (self.schedule.sigmas[t] * self.schedule.num_timesteps).to(self.dtype) / 1000
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x_t.device, dtype=torch.float32)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=self.dtype)
        v = self.denoiser(hidden_states=packed, timestep=timestep, guidance=guidance,
                          pooled_projections=cond.pooled.to(self.dtype),
                          encoder_hidden_states=cond.embeds.to(self.dtype), txt_ids=text_ids,
                          img_ids=self.img_ids(h, w)).sample
        return self.pipe._unpack_latents(v, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                         self.vae_scale_factor)

"""Stable Diffusion 3 / 3.5: an MMDiT on a 16-channel latent, trained by flow matching.

Conditioning (``StableDiffusion3Pipeline.encode_prompt``, no CFG): CLIP-L and
OpenCLIP-bigG penultimate states concatenated, zero-padded to T5's width and followed by
T5-XXL's states (77 + 256 tokens; zeros in T5's place when the model has none), and the
two CLIP pooled projections concatenated (2048). The transformer reads
``timestep = sigma * 1000`` and predicts the velocity eps - x0 (Esser et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.backends.base import Cond
from worker.backends.pipeline import PipelineBackend


@dataclass
class SD3Backend(PipelineBackend):
    max_sequence_length: int = 256

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return Cond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # The pipeline passes the scheduler's timesteps, sigma * num_train_timesteps (float).
        timestep = self.schedule.sigmas[t] * self.schedule.num_timesteps
        return self.denoiser(hidden_states=x_t.to(self.dtype), timestep=timestep,
                             encoder_hidden_states=cond.embeds.to(self.dtype),
                             pooled_projections=cond.pooled.to(self.dtype)).sample

"""DeepFloyd IF stage I: a 64 x 64 pixel-space UNet conditioned on T5-XXL.

Conditioning (``IFPipeline.encode_prompt``, no CFG, no caption cleaning): T5's last hidden
states over 77 tokens, computed with the attention mask (the UNet itself gets no mask).
The UNet predicts 6 channels, epsilon and the learned variance (``learned_range``): the
first 3 are epsilon, on the cosine (squaredcos_cap_v2) schedule. x0 is the image itself,
in [-1, 1]; scores use x0_hat unclipped and unthresholded, alike for every class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.backends.base import Cond
from worker.backends.pipeline import PipelineBackend


@dataclass
class DeepFloydBackend(PipelineBackend):
    channels: int = 3

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                            device=self.device, clean_caption=False)
        return Cond(embeds=embeds.to(self.dtype))  # (K, 77, 4096)

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond.embeds.to(self.dtype)).sample
        return out[:, : self.channels]  # (eps, variance) -> eps, as the pipeline splits it

"""Stable-Diffusion-style latent models: VAE + CLIP text encoder + UNet + scheduler.

x0 is the VAE latent mean times ``scaling_factor`` (0.18215 for SD 1/2), computed once
per image at the model's native resolution (centre crop, then resize).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from worker.backends.base import TextUNetBackend, pil_to_tensor


@dataclass
class LatentBackend(TextUNetBackend):
    vae: Any = None
    image_size: int = 512
    scaling_factor: float = 0.18215
    encode_batch_size: int = 8

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.encode_batch_size):
            chunk = images[i : i + self.encode_batch_size]
            px = torch.stack([pil_to_tensor(im, self.image_size, 3) for im in chunk])
            px = px.to(self.device, self.vae.dtype)  # (n, 3, S, S)
            latent = self.vae.encode(px).latent_dist.mean  # (n, 4, S/8, S/8)
            out.append(latent.float() * self.scaling_factor)
        return torch.cat(out)

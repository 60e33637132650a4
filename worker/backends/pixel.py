"""Pixel-space text-conditioned UNets (Imagen-style): the bundled demo model is one.

On disk (diffusers layout plus one file of ours)::

    model/
      difflabel.json      {"family": "pixel", "image_size": 8, "channels": 1,
                           "default_template": "...", ...}
      unet/               UNet2DConditionModel
      text_encoder/       a transformers text model (CLIPTextModel)
      tokenizer/          loaded with AutoTokenizer.from_pretrained
      scheduler/          DDPMScheduler config (the noise schedule), or a
                          FlowMatchEulerDiscreteScheduler config for a flow-matching UNet
                          (predicts eps - x0 from sigma * 1000; models/digits-flow)
      calibration.json    optional, written by `difflabel calibrate`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from worker.backends.base import TextUNetBackend, pil_to_tensor


@dataclass
class PixelBackend(TextUNetBackend):
    image_size: int = 64
    channels: int = 3

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([pil_to_tensor(im, self.image_size, self.channels) for im in images])
        return x.to(self.device)  # (N, C, S, S)

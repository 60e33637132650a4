"""Text encoders are freed once a label set is encoded, and come back unchanged for the next.

On tiny random pipelines of every family (tests/tiny_pipelines.py): after ``encode_prompts``
the pipeline holds no text encoder (the modules are garbage), the denoiser and VAE are
still loaded, and a second label set, encoded after the release, gets conditioning bit for
bit equal to the pipeline's own ``encode_prompt`` on a fresh load; the first label set
encoded again gives what it gave the first time.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import tiny_pipelines as tp
from worker.backends import load_backend
from worker.backends.pipeline import TEXT_ENCODERS

FIRST = ["a photo of a cat", "a photo of a dog"]
SECOND = ["a photo of a red car", "a photo of a blue bird", "a photo of a green fish"]


@torch.no_grad()
def _reference(family: str, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt (no CFG), as difflabel's adapters call it."""
    if family == "sdxl":
        e, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return {"embeds": e, "pooled": pooled}
    if family == "sd3":
        e, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
        return {"embeds": e, "pooled": pooled}
    if family == "flux":
        e, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
        return {"embeds": e, "pooled": pooled}
    if family == "pixart":
        e, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                           clean_caption=False)
        return {"embeds": e, "mask": mask}
    e, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
    return {"embeds": e}


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart", "deepfloyd-if"])
def test_text_encoders_are_freed_and_reloaded_identically(family, tmp_path):
    import diffusers

    path = tp.save(family, tmp_path / "model")
    b = load_backend(str(path), device="cpu")
    names = [n for n in TEXT_ENCODERS if (path / n).is_dir()]
    assert b.text_encoders == tuple(names) and names
    refs = [weakref.ref(getattr(b.pipe, n)) for n in names]

    first = b.encode_prompts(FIRST)
    gc.collect()
    assert all(getattr(b.pipe, n) is None for n in names)  # released...
    assert all(r() is None for r in refs)  # ...and garbage: nothing holds their weights
    assert b.denoiser is not None and (b.vae is not None or family == "deepfloyd-if")

    second = b.encode_prompts(SECOND)  # the encoders come back from disk for this label set
    assert all(getattr(b.pipe, n) is None for n in names)
    again = b.encode_prompts(FIRST)

    class_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    ref_pipe = getattr(diffusers, class_name).from_pretrained(path)
    if family == "flux":  # at the T5 length the backend reads, as build() sets it
        with torch.no_grad():
            e, pooled, _ = ref_pipe.encode_prompt(SECOND, None, device="cpu",
                                                  max_sequence_length=b.max_sequence_length)
        want = {"embeds": e, "pooled": pooled}
    else:
        want = _reference(family, ref_pipe, SECOND)
    for key, tensor in want.items():
        assert torch.equal(getattr(second, key), tensor.to(getattr(second, key).dtype)), key
    for key in first.parts:
        assert torch.equal(first.parts[key], again.parts[key]), key
        assert not torch.equal(first.parts[key][:1], second.parts[key][:1]) or key == "mask"


def test_scoring_needs_no_text_encoder(tmp_path):
    """After the release the denoiser alone scores: a round runs with the encoders gone."""
    from worker.config import ScoringConfig
    from worker.scoring import RoundRequest, score_round

    path = tp.save("sd3", tmp_path / "model")
    b = load_backend(str(path), device="cpu")
    cond = b.encode_prompts(FIRST)
    assert all(getattr(b.pipe, n) is None for n in b.text_encoders)
    x0 = torch.zeros(b.encode_images([_image()]).shape[1:])
    (errors,) = score_round(b, [RoundRequest("k", x0, [0, 1], 0, 3)], cond, ScoringConfig(seed=1))
    assert errors.shape == (2, 3) and (errors > 0).all()


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 40, 40))

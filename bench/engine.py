"""Engine efficiency: the classification loop's model evaluations per second divided by a bare
forward pass of the same model at the same batch size and dtype (issue 6, benchmark 1).

The loop is ``worker.classifier.classify_tensors`` at the default scoring settings: shared
noise drawn on the host, inputs gathered on the device, (item, class, sample) rows from
all items packed into calls of ``--batch-size``, the errors copied back once per round,
t-test pruning between rounds, and partial batches whenever a round's rows do not fill
one. The bare pass is ``unet(x_t, t, encoder_hidden_states=cond)`` on inputs already on
the device, repeated. Both sides alternate repeat by repeat; the ratio is per pair.

    python bench/engine.py                                   # CPU: demo, tiny pixel, tiny SD
    python bench/engine.py --models sd2-base,sd15-256 --device cuda --dtype fp16
    python bench/engine.py --models sd2-base --cpu-smoke      # the GPU path, shrunk, on CPU

Models: ``demo`` (the bundled digits model, held-out scans), ``tiny-pixel`` / ``tiny-sd``
(the test suite's random tiny models, random images), ``sd2-base`` (an SD-2-base-sized UNet,
865M parameters, 64x64 latents, random weights) and ``sd15-256`` (SD-1.5-sized, 32x32
latents, i.e. 256 px). Random-weight models never separate their classes, so they run with
``max_scores`` capped (``--random-max-scores``). Writes bench/results/engine[_<tag>].txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, digit_files, interleave, machine, markdown_table, one_thread,  # noqa: E402
                          paired_ratios, write_result)

#: UNet2DConditionModel configs of the published models (weights random), and the latent
#: size and text width each runs at.
UNETS = {
    "sd2-base": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                  use_linear_projection=True),
        latent=64, tokens=77),
    "sd15-256": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=8, cross_attention_dim=768),
        latent=32, tokens=77),
}
#: --cpu-smoke: the same block layout, shrunk until a CPU runs it in seconds.
SMOKE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
             attention_head_dim=(2, 2, 2, 2), cross_attention_dim=16)


@dataclass
class Workload:
    name: str
    backend: object
    keys: list[str]
    x0: object  # (N, C, H, W) on the device
    cond: object  # (K, L, D) on the device
    labels: list[str]
    config: object
    note: str


def _unet_backend(name: str, device, dtype, smoke: bool):
    """A PixelBackend around a random-weight UNet built from a published config (no download)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from worker.backends.base import NoiseSchedule
    from worker.backends.pixel import PixelBackend

    spec = UNETS[name]
    cfg = dict(spec["unet"], **(SMOKE if smoke else {}))
    latent = 8 if smoke else spec["latent"]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg).to(dtype).eval()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    schedule = NoiseSchedule(sched.alphas_cumprod.to(device, torch.float32), "epsilon")
    backend = PixelBackend(name=name, device=device, dtype=dtype, schedule=schedule, unet=unet,
                           image_size=latent, channels=4)
    params = sum(p.numel() for p in unet.parameters())
    return backend, latent, cfg["cross_attention_dim"], spec["tokens"], params


def workload(name: str, args, device, dtype) -> Workload:
    import torch

    from worker.backends import compile_unet, load_backend
    from worker.config import ScoringConfig

    random_cfg = ScoringConfig(batch_size=args.batch_size, max_scores=args.random_max_scores)
    if name == "demo":
        from worker.images import decode
        from worker.labels import prompts
        from worker.noise import content_key

        backend = load_backend("demo", device=str(device), dtype=dtype, compile=args.compile)
        labels, files, _ = digit_files(args.images)
        blobs = [f.read_bytes() for f in files]
        x0 = backend.encode_images([decode(b) for b in blobs])
        cond = backend.encode_prompts(prompts(backend.default_template, labels))
        return Workload(name, backend, [content_key(b) for b in blobs], x0, cond, labels,
                        ScoringConfig(batch_size=args.batch_size),
                        f"{len(files)} held-out digit scans, default settings")
    if name in ("tiny-pixel", "tiny-sd"):
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest  # the test suite's tiny-model builders

        out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) / "model"
        path = (conftest._build_pixel_model(out, "epsilon", 3) if name == "tiny-pixel"
                else conftest._build_sd_model(out, "epsilon"))
        backend = load_backend(str(path), device=str(device), dtype=dtype, compile=args.compile)
        shape = (3, backend.image_size, backend.image_size)
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand((args.images, *shape), generator=g) * 255
        from PIL import Image

        images = [Image.fromarray(p.permute(1, 2, 0).byte().numpy(), "RGB") for p in pixels]
        x0 = backend.encode_images(images)
        labels = ["cat", "dog", "bird", "fish", "car"]
        cond = backend.encode_prompts([f"a photo of a {w}" for w in labels])
        return Workload(name, backend, [f"img{i}" for i in range(args.images)], x0, cond, labels,
                        random_cfg, f"{args.images} random images, {len(labels)} classes, "
                        f"max_scores {args.random_max_scores}")
    backend, latent, width, tokens, params = _unet_backend(name, device, dtype, args.cpu_smoke)
    if args.compile:
        backend.unet = compile_unet(backend.unet, args.compile)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((args.images, 4, latent, latent), generator=g).to(device)
    labels = [f"class{k}" for k in range(args.classes)]
    cond = torch.randn((args.classes, tokens, width), generator=g).to(device, dtype)
    return Workload(name, backend, [f"img{i}" for i in range(args.images)], x0, cond, labels, random_cfg,
                    f"{params / 1e6:.0f}M params{' (cpu smoke)' if args.cpu_smoke else ''}, "
                    f"{latent}x{latent} latents, {args.images} images x {args.classes} classes, "
                    f"max_scores {args.random_max_scores}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_rate(w: Workload) -> tuple[float, int]:
    """(evaluations per second, evaluations) of one classify_tensors run."""
    from worker.classifier import classify_tensors

    _sync(w.backend.device)
    t0 = time.perf_counter()
    results = classify_tensors(w.backend, w.keys, w.x0, w.cond, w.labels, w.config)
    _sync(w.backend.device)
    evals = sum(r.n_evals for r in results)
    return evals / (time.perf_counter() - t0), evals


def bare_rate(w: Workload, evals: int) -> float:
    """Evaluations per second of the UNet alone at the batch size, about ``evals`` of them."""
    import torch

    b, dev = w.config.batch_size, w.backend.device
    shape = tuple(w.x0.shape[1:])
    x = torch.randn((b, *shape), device=dev).to(w.backend.dtype)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, w.backend.schedule.num_timesteps, (b,), device=dev)
    c = w.cond[torch.arange(b, device=dev) % w.cond.shape[0]].to(w.backend.dtype)
    calls = max(2, round(evals / b))
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(calls):
            w.backend.unet(x, t, encoder_hidden_states=c)
        _sync(dev)
    return calls * b / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,tiny-pixel,tiny-sd")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: fp16 on CUDA)")
    ap.add_argument("--compile", default=None, help="a torch.compile mode, or 1 for the default mode")
    ap.add_argument("--batch-size", type=int, default=None, help="default: ScoringConfig's (256)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--classes", type=int, default=10, help="classes of the random-weight SD models")
    ap.add_argument("--random-max-scores", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true", help="shrunk SD configs, to test the GPU path on CPU")
    ap.add_argument("--tag", default="", help="results file bench/results/engine_<tag>.txt")
    args = ap.parse_args()
    one_thread()
    import torch

    from worker.backends import parse_compile, parse_dtype, resolve_device
    from worker.config import DEFAULT_BATCH_SIZE

    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    args.compile = parse_compile(args.compile)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        from worker.torch_setup import configure

        configure()
    rows, measured = [], {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        w = workload(name, args, device, dtype)
        warm_rate, evals = loop_rate(w)  # warm-up: first-call costs (cuDNN autotune, compile)
        bare_rate(w, evals)
        print(f"{name}: built and warmed up in {time.perf_counter() - t0:.0f} s; {evals} evals per loop "
              f"run (first run {warm_rate:.0f}/s)", file=sys.stderr)
        rates = interleave({"loop": lambda: loop_rate(w)[0], "bare": lambda: bare_rate(w, evals)},
                           args.repeats)
        med, lo, hi = paired_ratios(rates["loop"], rates["bare"])
        rows.append((name, str(dtype).removeprefix("torch."), w.config.batch_size,
                     f"{statistics.median(rates['loop']):,.0f}", f"{statistics.median(rates['bare']):,.0f}",
                     f"**{med:.3f}** ({lo:.3f}-{hi:.3f})", f"{evals / len(w.keys):.1f}", w.note))
        print(f"  loop {[round(r) for r in rates['loop']]}  bare {[round(r) for r in rates['bare']]}",
              file=sys.stderr)
        measured[name] = dict(loop_evals_per_s=statistics.median(rates["loop"]),
                              bare_evals_per_s=statistics.median(rates["bare"]), ratio=med,
                              batch=w.config.batch_size, dtype=str(dtype), evals_per_image=evals / len(w.keys))
        del w
    table = markdown_table(
        ("model", "dtype", "batch", "loop evals/s", "bare forward evals/s",
         "loop / bare (median, range over repeats)", "evals/image", "workload"), rows)
    text = (f"Engine efficiency (target >= 0.9): {args.repeats} interleaved repeats; device {device}"
            f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
            f"{machine()}; compile {args.compile or 'off'}\n"
            f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n\n{table}\n")
    path = write_result("engine" + (f"_{args.tag}" if args.tag else ""), text)
    path.with_suffix(".json").write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-family throughput and memory: each family's denoiser at its published size, random
weights built from config (no downloads), scored through difflabel's own adapter and
scoring loop (worker.scoring.score_round: shared noise, the family's predict, the DDPM or
flow-matching error) at a few batch sizes.

    python bench/families_gpu.py --device cuda      # bench/gpu.sh runs this
    python bench/families_gpu.py --cpu-smoke        # the same code on tiny configs, on the CPU
    python bench/families_gpu.py --check-sizes      # parameter counts on the meta device, no compute

Models (parameters as published): SD-2-base UNet 0.87B at 512 px (64x64 latents), SDXL UNet
2.57B at 1024 px, SD3-medium MMDiT 2.03B at 1024 px, FLUX.1 transformer 11.9B (dev, guidance
embedding) at 1024 px, PixArt-alpha DiT-XL/2 0.61B at 1024 px, DeepFloyd IF-I-XL UNet 4.30B at
64 px. Dtype per family as difflabel loads it on CUDA: float16 for SD and SDXL, bfloat16 for
the T5 families. Conditioning is random, of each family's shape (77 CLIP tokens; SD3 77 + 256
tokens; FLUX 512 T5 tokens; PixArt 120 with a mask; IF 77). Text encoders and VAEs are not
built: difflabel frees the encoders after a label set is encoded, and the VAE runs once per image.

Per batch size: one warm-up call, then ``--calls`` calls of ``score_round``, timed with
synchronisation; evaluations per second and the peak of torch.cuda.max_memory_allocated (GiB,
weights included) over both. ``--budget`` seconds caps the whole run: what would start after
it is skipped and listed. The table is rewritten after every family, so a run stopped from
outside keeps what it measured. Writes bench/results/families_<tag>.txt and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, markdown_table  # noqa: E402

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

#: Per family: the denoiser class and published config, the shrunk overrides for --cpu-smoke,
#: x0's shape (channels, side) and the conditioning's shape, each (published, smoke).
FAMILIES = {
    "sd2-base": dict(
        family="sd", cls="UNet2DConditionModel", title="SD-2-base UNet, 512 px",
        config=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
        smoke=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                   attention_head_dim=(2, 2, 2, 2), cross_attention_dim=16),
        x0=((4, 64), (4, 8)), tokens=((77, 1024), (8, 16)), published=0.87e9,
        batches=((32, 128, 256), (4, 8))),
    "sdxl": dict(
        family="sdxl", cls="UNet2DConditionModel", title="SDXL base UNet, 1024 px",
        config=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        smoke=dict(block_out_channels=(8, 16, 16), norm_num_groups=4, layers_per_block=1,
                   transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4), cross_attention_dim=32,
                   addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16),
        x0=((4, 128), (4, 8)), tokens=((77, 2048), (8, 32)), pooled=(1280, 16), published=2.57e9,
        batches=((8, 32, 64), (4, 8))),
    "sd3": dict(
        family="sd3", cls="SD3Transformer2DModel", title="SD3-medium MMDiT, 1024 px",
        config=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        smoke=dict(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                   caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16),
        x0=((16, 128), (16, 8)), tokens=((333, 4096), (12, 32)), pooled=(2048, 32), published=2.03e9,
        scheduler=dict(shift=3.0), batches=((8, 32, 64), (4, 8))),
    "flux": dict(
        family="flux", cls="FluxTransformer2DModel", title="FLUX.1-dev transformer, 1024 px",
        config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        smoke=dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
        x0=((16, 128), (16, 8)), tokens=((512, 4096), (8, 32)), pooled=(768, 16), published=11.9e9,
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
        batches=((1, 4, 8), (2, 4))),
    "pixart": dict(
        family="pixart", cls="PixArtTransformer2DModel", title="PixArt-alpha DiT-XL/2, 1024 px",
        config=dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
                    out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, attention_bias=True,
                    activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6,
                    use_additional_conditions=True),
        smoke=dict(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=3, cross_attention_dim=24,
                   caption_channels=32),
        x0=((4, 128), (4, 8)), tokens=((120, 4096), (8, 32)), published=0.61e9,
        batches=((8, 32, 64), (4, 8))),
    "deepfloyd-if": dict(
        family="deepfloyd-if", cls="UNet2DConditionModel", title="DeepFloyd IF-I-XL UNet, 64 px",
        config=dict(sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
                    block_out_channels=(704, 1408, 2112, 2816),
                    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=2816,
                    encoder_hid_dim=4096, attention_head_dim=64, addition_embed_type="text",
                    addition_embed_type_num_heads=64, cross_attention_norm="group_norm",
                    resnet_time_scale_shift="scale_shift", act_fn="gelu"),
        smoke=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                   up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32,
                   encoder_hid_dim=32, attention_head_dim=8, addition_embed_type_num_heads=2, norm_num_groups=8),
        x0=((3, 64), (3, 8)), tokens=((77, 4096), (8, 32)), published=4.30e9,
        batches=((16, 64, 128), (4, 8))),
}


@contextlib.contextmanager
def _default_dtype(dtype):
    """Build parameters directly in ``dtype`` (FLUX.1 in fp32 would first take 48 GB)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_denoiser(name: str, device, dtype, smoke: bool):
    """The family's denoiser with random weights, in ``dtype`` on ``device``."""
    import diffusers
    import torch

    spec = FAMILIES[name]
    cfg = {**spec["config"], **(spec["smoke"] if smoke else {})}
    torch.manual_seed(0)
    build_dtype = dtype if device.type == "cuda" else torch.float32
    with torch.device(device), _default_dtype(build_dtype):
        model = getattr(diffusers, spec["cls"])(**cfg)
    return model.to(dtype).eval()


def _ddpm(device, **kw):
    import torch
    from diffusers import DDPMScheduler

    from worker.backends.base import NoiseSchedule

    return NoiseSchedule(DDPMScheduler(num_train_timesteps=1000, **kw).alphas_cumprod.to(device, torch.float32))


def make_backend(name: str, model, device, dtype, smoke: bool):
    """(backend, x0 shape, cond) for ``model``: difflabel's own adapter for the family."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from worker.backends.base import Cond
    from worker.backends.pipeline import flow_schedule

    spec = FAMILIES[name]
    i = 1 if smoke else 0
    channels, side = spec["x0"][i]
    length, width = spec["tokens"][i]
    common = dict(name=name, device=device, dtype=dtype)

    def cond(k: int):
        g = torch.Generator().manual_seed(1)
        parts = {"embeds": torch.randn(k, length, width, generator=g)}
        if "pooled" in spec:
            parts["pooled"] = torch.randn(k, spec["pooled"][i], generator=g)
        if name == "pixart":
            mask = torch.zeros(k, length, dtype=torch.long)
            mask[:, : max(2, length // 6)] = 1  # a short caption's valid tokens
            return Cond(embeds=parts["embeds"].to(device, dtype), mask=mask.to(device))
        if name == "sd2-base":
            return parts["embeds"].to(device, dtype)
        return Cond(**{k_: v.to(device, dtype) for k_, v in parts.items()})

    if name == "sd2-base":
        from worker.backends.pixel import PixelBackend

        backend = PixelBackend(**common, schedule=_ddpm(device, **_SD_BETAS), unet=model, image_size=side,
                               channels=channels)
    elif name == "sdxl":
        from worker.backends.sdxl import SDXLBackend

        px = side * 8
        ids = torch.tensor([[px, px, 0, 0, px, px]], device=device, dtype=dtype)
        backend = SDXLBackend(**common, schedule=_ddpm(device, **_SD_BETAS), denoiser=model, time_ids=ids,
                              image_size=px)
    elif name in ("sd3", "flux"):
        sched = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                 **FlowMatchEulerDiscreteScheduler(**spec["scheduler"]).config}
        if name == "sd3":
            from worker.backends.sd3 import SD3Backend

            tokens = (side // 2) ** 2
            backend = SD3Backend(**common, schedule=flow_schedule(sched, tokens, name, device), denoiser=model)
        else:
            from diffusers import FluxPipeline

            from worker.backends.flux import FluxBackend

            tokens = (side // 2) ** 2
            # The pipeline's packing helpers are static: the class serves as ``pipe``.
            backend = FluxBackend(**common, schedule=flow_schedule(sched, tokens, name, device), denoiser=model,
                                  pipe=FluxPipeline, guidance=1.0, vae_scale_factor=8)
    elif name == "pixart":
        from worker.backends.pixart import PixArtBackend

        backend = PixArtBackend(**common, schedule=_ddpm(device), denoiser=model, image_size=side * 8,
                                micro_conditions=bool(model.config.use_additional_conditions),
                                latent_channels=channels)
    else:
        from worker.backends.deepfloyd import DeepFloydBackend

        backend = DeepFloydBackend(**common, schedule=_ddpm(device, beta_schedule="squaredcos_cap_v2"),
                                   denoiser=model, channels=channels, image_size=side)
    return backend, (channels, side, side), cond


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backend, shape, cond, batch: int, calls: int) -> dict:
    """Evaluations per second of ``calls`` full calls of ``batch`` rows, and peak memory."""
    import torch

    from worker.config import ScoringConfig
    from worker.scoring import RoundRequest, score_round

    device = backend.device
    k = min(batch, 16)
    per_item = k * max(1, batch // k)  # rows one item brings: k classes x n samples
    n = per_item // k
    c = cond(k)
    g = torch.Generator().manual_seed(0)
    config = ScoringConfig(batch_size=batch, max_round_evals=0)

    def run(rows: int) -> None:
        items = max(1, rows // per_item)
        x0 = torch.randn((items, *shape), generator=g).to(device)
        reqs = [RoundRequest(f"img{j}", x0[j], list(range(k)), 0, n) for j in range(items)]
        score_round(backend, reqs, c, config)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run(batch)  # warm-up: kernels chosen, memory pools grown
    _sync(device)
    t0 = time.perf_counter()
    run(batch * calls)
    _sync(device)
    seconds = time.perf_counter() - t0
    rows = max(1, (batch * calls) // per_item) * per_item
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"batch": batch, "evals": rows, "seconds": seconds, "evals_per_s": rows / seconds, "peak_gib": peak}


def check_sizes() -> list[tuple[str, float]]:
    """Parameter counts of the published configs, built on the meta device."""
    import diffusers
    import torch

    out = []
    for name, spec in FAMILIES.items():
        with torch.device("meta"):
            model = getattr(diffusers, spec["cls"])(**spec["config"])
        out.append((name, sum(p.numel() for p in model.parameters())))
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: checks the code path")
    ap.add_argument("--check-sizes", action="store_true", help="print parameter counts (meta device) and exit")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per batch size")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run")
    ap.add_argument("--tag", default=None, help="results file families_<tag>.txt (default gpu, or smoke)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args()
    start = time.perf_counter()
    import torch

    from worker.backends import parse_dtype
    from worker.families import by_name
    from worker.torch_setup import configure

    configure()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # the notice about casting with to()
    if args.check_sizes:
        for name, n in check_sizes():
            print(f"{name:<13} {n / 1e9:.3f}B parameters (published {FAMILIES[name]['published'] / 1e9:.2f}B)")
        return
    device = torch.device("cpu" if args.cpu_smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here: run with --cpu-smoke to check the code on the CPU")
    tag = args.tag or ("smoke" if args.cpu_smoke else "gpu")
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown family {unknown[0]!r}: use some of {', '.join(FAMILIES)}")
    rows, measured, skipped = [], {}, []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    def write() -> None:
        table = markdown_table(("family", "denoiser", "params", "dtype", "batch", "evals/s", "peak GiB",
                                "evals timed", "build s"), rows)
        text = (f"Per-family scoring throughput, random weights at published sizes{' (CPU SMOKE: tiny configs)' if args.cpu_smoke else ''}\n"
                f"device {device} ({gpu}); {machine()}\n"
                f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n\n{table}\n")
        if skipped:
            text += f"\nskipped (time budget {args.budget:g} s): {', '.join(skipped)}\n"
        (out / f"families_{tag}.txt").write_text(text)
        (out / f"families_{tag}.json").write_text(json.dumps(measured, indent=2) + "\n")

    for name in names:
        spec = FAMILIES[name]
        if time.perf_counter() - start > args.budget * 0.85:
            skipped.append(name)
            write()
            continue
        dtype = parse_dtype(by_name(spec["family"]).cuda_dtype) if device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        model = build_denoiser(name, device, dtype, args.cpu_smoke)
        _sync(device)
        params = sum(p.numel() for p in model.parameters())
        backend, shape, cond = make_backend(name, model, device, dtype, args.cpu_smoke)
        built = time.perf_counter() - t0
        results = []
        for batch in spec["batches"][1 if args.cpu_smoke else 0]:
            if time.perf_counter() - start > args.budget * 0.9:
                skipped.append(f"{name} batch {batch}")
                continue
            try:
                r = measure(backend, shape, cond, batch, args.calls)
            except torch.OutOfMemoryError:
                skipped.append(f"{name} batch {batch} (out of memory)")
                break
            results.append(r)
            size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.3f}M"
            rows.append((name, spec["title"] + (" (tiny config)" if args.cpu_smoke else ""), size,
                         str(dtype).removeprefix("torch."), batch,
                         f"{r['evals_per_s']:,.1f}", "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                         r["evals"], f"{built:.0f}"))
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            print(f"{name} batch {batch}: {r['evals_per_s']:,.1f} evals/s, peak {peak} GiB", file=sys.stderr)
        measured[name] = {"params": params, "dtype": str(dtype), "build_seconds": built, "batches": results,
                          "title": spec["title"]}
        del backend, model, cond
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    write()
    print((out / f"families_{tag}.txt").read_text())


if __name__ == "__main__":
    main()

"""Load a model by hub id, local directory, single .safetensors file or the name ``demo``.

One adapter per model family (k-diffusion's pattern): ``PixelBackend`` for pixel-space
text-conditioned UNets, ``LatentBackend`` for Stable-Diffusion-style latent models, and
one per diffusers text-to-image family (SDXL, SD3, FLUX.1, PixArt, DeepFloyd IF; see
``worker.families``), chosen by the ``_class_name`` in the folder's model_index.json.
Every failure to find or load a model is a ``ModelNotFoundError`` with one line that
names the id or path and what to do; a model of a family difflabel does not score with
is a ``UsageError`` that names the family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from worker.backends.base import PREDICTION_TYPES, Backend, Cond, Denoiser, NoiseSchedule
from worker.errors import DifflabelError, ModelNotFoundError, UsageError
from worker.families import Family, by_name, family_for_pipeline, pipeline_class_name
from worker.model_files import DEMO_MODEL, demo_model_path

__all__ = ["Backend", "Cond", "Denoiser", "NoiseSchedule", "load_backend", "demo_model_path", "resolve_device",
           "parse_dtype", "parse_compile"]


_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Files of a hub snapshot read before the family is known; then the family's own
#: ``hub_patterns`` (no pipeline extras such as the safety checker).
_INDEX_PATTERNS = ["model_index.json", "difflabel.json", "calibration.json"]


def resolve_device(device: str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here: use --device cpu")
    return dev


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16", "float16", torch.float32, ... -> a torch dtype; None or "" or "auto" -> None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = value.strip().lower().removeprefix("torch.")
    if key in ("", "auto"):
        return None
    if key not in _DTYPES:
        raise UsageError(f"unknown dtype {value!r}: use float16, bfloat16 or float32")
    return _DTYPES[key]


def parse_compile(value: bool | str | None) -> str | None:
    """A compile setting -> a torch.compile mode, or None for eager.

    True, "1", "true", "yes", "on" -> "default"; a mode name -> itself; False, None, "",
    "0", "false", "no", "off" -> None."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    key = value.strip().lower()
    if key in ("", "0", "false", "no", "off"):
        return None
    if key in ("1", "true", "yes", "on"):
        return "default"
    if key not in _COMPILE_MODES:
        raise UsageError(f"unknown torch.compile mode {value!r}: use 1 or one of {', '.join(_COMPILE_MODES)}")
    return key


def load_backend(model: str | os.PathLike | None = None, *, device: str | None = None,
                 dtype: str | torch.dtype | None = None, compile: bool | str | None = None,
                 max_batch: int | None = None) -> Backend:
    """Load ``model`` (``None``/"demo", a local directory, or a hub id) onto ``device``.

    ``dtype``: float16, bfloat16 or float32 (default float16 on CUDA, float32 on CPU).
    ``compile``: True or a torch.compile mode ("default", "reduce-overhead", "max-autotune")
    wraps the UNet in torch.compile (default off: the first calls then take minutes, and each
    new batch shape compiles again). ``max_batch``: a ceiling on rows per model call for this
    device, below whatever a job asks (default none until an out-of-memory error sets one).
    The CLI passes its settings (DIFFLABEL_DTYPE, DIFFLABEL_COMPILE, DIFFLABEL_MAX_BATCH).
    Attention runs through PyTorch's fused ``scaled_dot_product_attention`` (diffusers'
    default ``AttnProcessor2_0``); on CUDA the UNet is channels-last.
    """
    dev = resolve_device(device)
    dtype = parse_dtype(dtype)
    compile_mode = parse_compile(compile)
    spec = str(model) if model not in (None, "") else DEMO_MODEL
    if spec == DEMO_MODEL:
        path = demo_model_path()
        if not (path / "difflabel.json").is_file():
            raise ModelNotFoundError(
                f"the demo model is missing at {path}: run `difflabel train-demo` or pass --model ID|DIR"
            )
    else:
        path = _local_path(spec)
    if path.is_file():
        backend = _load_single_file(path, spec, dev, dtype)
    else:
        backend = _load_folder(path, spec, dev, dtype)
    if compile_mode is not None:
        attr = "unet" if hasattr(backend, "unet") else "denoiser"
        setattr(backend, attr, compile_unet(getattr(backend, attr), compile_mode))
    if max_batch:
        backend.batch_sizer.limit = int(max_batch)
    return backend


def _default_dtype(dtype: torch.dtype | None, device: torch.device, family: Family | None) -> torch.dtype:
    """The asked dtype, else the family's on CUDA (float16 for SD and SDXL, bfloat16 for the
    T5-conditioned families), float32 on CPU."""
    if dtype is not None:
        return dtype
    if device.type != "cuda":
        return torch.float32
    return parse_dtype(family.cuda_dtype) if family is not None else torch.float16


def _load_folder(path: Path, spec: str, device: torch.device, dtype: torch.dtype | None) -> Backend:
    if not (path / "difflabel.json").is_file() and not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a diffusers model directory (no model_index.json or difflabel.json)"
        )
    try:
        has_meta = (path / "difflabel.json").is_file()
        meta = json.loads((path / "difflabel.json").read_text()) if has_meta else {}
        # difflabel's own families name themselves; a diffusers folder names its pipeline.
        class_name = pipeline_class_name(path) if "family" not in meta else None
        family = family_for_pipeline(class_name, spec) if class_name and not _own(class_name) else None
        if family is not None and family.name != "sd":
            return _load_pipeline_dir(family, class_name, path, meta, spec, device,
                                      _default_dtype(dtype, device, family))
        meta.setdefault("family", "pixel" if has_meta or not (path / "vae").is_dir() else "latent")
        return _load_dir(path, meta, spec, device, _default_dtype(dtype, device, family))
    except DifflabelError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types (safetensors, json, OSError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"could not load model {spec!r} from {path}: {first}") from e


def _load_pipeline_dir(family: Family, class_name: str, path: Path, meta: dict, spec: str,
                       device: torch.device, dtype: torch.dtype) -> Backend:
    from worker.backends.build import build
    from worker.backends.pipeline import load_pipeline

    _quiet_libraries()
    pipe = load_pipeline(family, class_name, path, spec, dtype, meta)
    return build(family, pipe, spec=spec, device=device, dtype=dtype, meta=meta, path=path,
                 calibration=_calibration(path))


def _load_single_file(path: Path, spec: str, device: torch.device, dtype: torch.dtype | None) -> Backend:
    """A single .safetensors checkpoint of a family diffusers' from_single_file reads."""
    from worker.backends.build import build, load_single_file, single_file_family

    _quiet_libraries()
    family, kind = single_file_family(path, spec)
    dtype = _default_dtype(dtype, device, family)
    pipe = load_single_file(family, kind, path, spec, dtype)
    try:
        if family.name == "sd":
            return _latent_from_pipeline(pipe, spec, device, dtype)
        return build(family, pipe, spec=spec, device=device, dtype=dtype, meta={}, path=None, calibration=None)
    except DifflabelError:
        raise
    except Exception as e:  # noqa: BLE001 - an inconsistent checkpoint raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"could not load model file {spec}: {first}") from e


def _latent_from_pipeline(pipe, spec: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """An SD 1.x / 2.x single file: the same adapter as an SD folder."""
    from worker.backends.latent import LatentBackend
    from worker.backends.pipeline import ddpm_schedule, place

    vae = pipe.vae.to(device).eval()
    return LatentBackend(
        name=spec, device=device, dtype=dtype, schedule=ddpm_schedule(pipe.scheduler.config, spec, device),
        unet=place(pipe.unet, device, channels_last=True), text_encoder=pipe.text_encoder.to(device).eval(),
        tokenizer=pipe.tokenizer, vae=vae, image_size=int(pipe.unet.config.sample_size * pipe.vae_scale_factor),
        scaling_factor=float(vae.config.scaling_factor or 0.18215),
    )


def _calibration(path: Path) -> dict | None:
    f = path / "calibration.json"
    return json.loads(f.read_text()) if f.is_file() else None


def compile_unet(unet: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """The UNet wrapped in torch.compile (compiled lazily, on the first call of each shape)."""
    return torch.compile(unet, mode=None if mode == "default" else mode)


def _local_path(spec: str) -> Path:
    """A local model folder or single checkpoint file, else the hub snapshot of an id."""
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix in (".safetensors", ".ckpt", ".pt", ".bin")):
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_like_path or path.exists():
        raise ModelNotFoundError(f"model path {spec} does not exist or is not a directory: check the path")
    return _hub_snapshot(spec)


def _hub_snapshot(repo_id: str) -> Path:
    """A hub id: its model_index.json names the family, whose files come next; each from the
    local Hugging Face cache first, then a download unless HF_HUB_OFFLINE."""
    index_dir = _snapshot(repo_id, _INDEX_PATTERNS)
    class_name = pipeline_class_name(index_dir)
    family = family_for_pipeline(class_name, repo_id) if class_name and not _own(class_name) else by_name("sd")
    return _snapshot(repo_id, _INDEX_PATTERNS + list(family.hub_patterns))


def _own(class_name: str) -> bool:
    """difflabel's own model layout (``DifflabelPixelPipeline``: difflabel.json says the rest)."""
    return class_name.startswith("Difflabel")


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss falls through to a download
        pass
    from huggingface_hub import constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:  # Hugging Face's own setting, as huggingface_hub read it
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it on a connected machine or pass a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be downloaded ({type(e).__name__}): check the id and the "
            "network, or pass a local directory"
        ) from e


def _quiet_libraries() -> None:
    """Library progress bars and notices would drown our one-line messages."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_dir(path: Path, meta: dict, spec: str, device: torch.device, dtype: torch.dtype) -> Backend:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    _quiet_libraries()

    family = meta.get("family", "pixel")
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if "FlowMatch" in sched_cfg.get("_class_name", ""):
        # A flow-matching pixel UNet (velocity eps - x0 from sigma * T, as models/digits-flow):
        # scored on its scheduler's own sigma grid, as SD3 is; one token per pixel (only a
        # dynamic shift reads the count).
        if family != "pixel":
            raise UsageError(f"model {spec!r} is a flow-matching model with a {family} UNet, which difflabel "
                             "does not support (flow-matching latent models are scored as SD3 and FLUX.1 "
                             "pipelines)")
        from worker.backends.pipeline import flow_schedule

        size = int(meta.get("image_size", 0) or 64)
        schedule = flow_schedule(sched_cfg, size * size, spec, device)
    else:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise UsageError(f"model {spec!r} has unsupported prediction_type {prediction_type!r}")
        schedule = NoiseSchedule(scheduler.alphas_cumprod.to(device, torch.float32), prediction_type)

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
    if tokenizer.model_max_length > 10_000:  # unset in the tokenizer files
        tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    text_encoder.to(device).eval()
    unet.to(device).eval()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)

    calibration = None
    if (path / "calibration.json").is_file():
        calibration = json.loads((path / "calibration.json").read_text())
    common = dict(
        name=spec, device=device, dtype=dtype, schedule=schedule,
        default_template=meta.get("default_template"), calibration=calibration, path=path,
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
    )
    if family == "pixel":
        from worker.backends.pixel import PixelBackend

        return PixelBackend(
            **common,
            image_size=int(meta.get("image_size", unet.config.sample_size)),
            channels=int(meta.get("channels", unet.config.in_channels)),
        )
    if family == "latent":
        from diffusers import AutoencoderKL

        from worker.backends.latent import LatentBackend

        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype).to(device).eval()
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return LatentBackend(
            **common, vae=vae,
            image_size=int(meta.get("image_size", unet.config.sample_size * vae_scale)),
            scaling_factor=float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215),
        )
    raise ModelNotFoundError(f"model {spec!r}: unknown family {family!r} in {path / 'difflabel.json'}")

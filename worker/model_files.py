"""Facts about a model read from its files, without importing torch.

The orchestrator uses these to store a job's template and to fail fast on a model path
that does not exist, before any worker loads weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: Name that selects the bundled demo model.
DEMO_MODEL = "demo"
#: A Hugging Face hub id: ``owner/name``.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
#: The files of a hub snapshot the tokenizer needs.
_TOKENIZER_PATTERNS = ["model_index.json", "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*",
                       "text_encoder/config.json"]


def demo_model_path() -> Path:
    """The bundled digits model: ``models/digits`` beside the packages."""
    return Path(__file__).resolve().parents[1] / "models" / "digits"


def local_model_dir(spec: str | None) -> Path | None:
    """The directory ``spec`` names ("demo" or a path), or None for a hub id."""
    if spec in (None, "", DEMO_MODEL):
        return demo_model_path()
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def model_metadata(spec: str | None) -> dict:
    """``difflabel.json`` of a local model, or {} (hub ids, plain diffusers folders)."""
    d = local_model_dir(spec)
    if d is not None and (d / "difflabel.json").is_file():
        return json.loads((d / "difflabel.json").read_text())
    return {}


def load_tokenizer(model: str | None) -> Any | None:
    """The tokenizer of ``model`` ("demo", a diffusers directory, or a hub id already in the
    local Hugging Face cache), with ``model_max_length`` set as the model loader sets it;
    None when it is not on this machine or cannot be read (loading the model then reports
    why). Nothing is downloaded.

    CLIP and tokenizer.json tokenizers load through their own classes: transformers 5's
    AutoTokenizer imports torch (seconds), which the orchestrator otherwise never needs."""
    d = local_model_dir(model)
    if d is None and model and not model.startswith((".", "/", "~")) and _HUB_ID.match(model):
        d = _cached_snapshot(model)
    tok_dir = _prompt_tokenizer_dir(d) if d is not None else None
    if tok_dir is None or not tok_dir.is_dir():
        return None
    try:
        cfg_file = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if str(cfg.get("tokenizer_class") or "").startswith("CLIPTokenizer"):
            # from_pretrained(dir), never CLIPTokenizer(vocab_file=...): in transformers 5 the
            # latter silently builds a broken tokenizer.
            from transformers import CLIPTokenizer as cls
        elif (tok_dir / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as cls
        else:
            from transformers import AutoTokenizer as cls  # other layouts: pays for torch
        tokenizer = cls.from_pretrained(tok_dir)
    except Exception:  # noqa: BLE001 - unreadable files: the model loader names the problem
        return None
    if tokenizer.model_max_length > 10_000:  # unset in the tokenizer files: the encoder's length
        enc = d / tok_dir.name.replace("tokenizer", "text_encoder") / "config.json"  # its own encoder
        try:
            n = json.loads(enc.read_text()).get("max_position_embeddings") if enc.is_file() else None
        except (OSError, ValueError):
            n = None
        if n:
            tokenizer.model_max_length = int(n)
    return tokenizer


def _prompt_tokenizer_dir(d: Path) -> Path:
    """The tokenizer whose truncation the model reads: T5's for SD3 and FLUX (their CLIP
    tokenizers cut at 77 tokens, T5 reads on), else ``tokenizer/``."""
    from worker.families import FAMILIES, pipeline_class_name

    try:
        name = pipeline_class_name(d)
    except Exception:  # noqa: BLE001 - an unreadable index: the model loader names the problem
        name = None
    for f in FAMILIES:
        if name in f.pipelines and (d / f.prompt_tokenizer).is_dir():
            return d / f.prompt_tokenizer
    return d / "tokenizer"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of ``repo_id``, or None (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_TOKENIZER_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or huggingface_hub missing
        return None

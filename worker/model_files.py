"""Facts about a model read from its files, without importing torch.

The orchestrator uses these to store a job's template and to fail fast on a model path
that does not exist, before any worker loads weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Name that selects the bundled demo model.
DEMO_MODEL = "demo"


def demo_model_path() -> Path:
    """The bundled digits model: ``models/digits`` beside the packages, or DIFFLABEL_DEMO_MODEL."""
    env = os.environ.get("DIFFLABEL_DEMO_MODEL")
    if env:
        return Path(env)
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

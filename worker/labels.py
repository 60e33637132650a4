"""Label lists and prompt templates, validated with one-line errors (no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from worker.errors import UsageError

#: Most labels one job may have; each costs a text embedding and model calls.
MAX_LABELS = 10_000
#: Longest prompt accepted, in characters (tokenizers truncate long before this).
MAX_PROMPT_CHARS = 1_000


def parse_labels(text: str | None = None, file: str | Path | None = None) -> list[str]:
    """Labels from ``a,b,c`` or from a file with one label per line (# comments allowed)."""
    if (text is None) == (file is None):
        raise UsageError("give the labels with --labels a,b,c or --labels-file FILE (exactly one)")
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read labels file {file}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise UsageError(f"labels file {file} is not UTF-8 text") from e
        raw = [ln for ln in lines if not ln.lstrip().startswith("#")]
    else:
        raw = text.split(",")
    return validate_labels(raw)


def validate_labels(raw: Iterable[str]) -> list[str]:
    labels = [" ".join(s.split()) for s in raw]
    labels = [s for s in labels if s]
    if not labels:
        raise UsageError("the label list is empty: give at least two labels, e.g. --labels cat,dog")
    if len(labels) < 2:
        raise UsageError(f"only one label ({labels[0]!r}): give at least two labels to choose between")
    if len(labels) > MAX_LABELS:
        raise UsageError(f"{len(labels)} labels is more than the limit of {MAX_LABELS}")
    seen: dict[str, int] = {}
    for i, s in enumerate(labels):
        key = s.casefold()
        if key in seen:
            raise UsageError(f"duplicate label {s!r} (labels {seen[key] + 1} and {i + 1}): remove one")
        seen[key] = i
    return labels


def validate_template(template: str) -> str:
    """A template must contain exactly one ``{}`` and no other braces."""
    if template.count("{}") != 1:
        raise UsageError(
            f"template {template!r} must contain {{}} exactly once where the label goes, "
            "e.g. 'a photo of a {}.'"
        )
    rest = template.replace("{}", "")
    if "{" in rest or "}" in rest:
        raise UsageError(f"template {template!r} has braces other than the single {{}}: remove them")
    if len(template) > MAX_PROMPT_CHARS:
        raise UsageError(f"template is {len(template)} characters; the limit is {MAX_PROMPT_CHARS}")
    return template


def prompts(template: str, labels: list[str]) -> list[str]:
    """Fill the template; str.replace, so braces or quotes inside a label are kept as text."""
    validate_template(template)
    return [template.replace("{}", label) for label in labels]

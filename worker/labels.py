"""Label lists and prompt templates, validated with one-line errors (no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.errors import UsageError

#: Most labels one job may have; each costs a text embedding and model calls.
MAX_LABELS = 10_000
#: Longest prompt accepted, in characters (tokenizers truncate long before this).
MAX_PROMPT_CHARS = 1_000
#: A tokenizer's model_max_length above this means "not set" (transformers uses 1e30).
UNSET_MAX_LENGTH = 10_000
#: The byte-order mark some editors (Notepad, Excel) put at the start of UTF-8 text.
BOM = "\ufeff"


def parse_labels(text: str | None = None, file: str | Path | None = None) -> list[str]:
    """Labels from ``a,b,c`` or from a file with one label per line (# comments allowed)."""
    if (text is None) == (file is None):
        raise UsageError("give the labels with --labels a,b,c or --labels-file FILE (exactly one)")
    if file is not None:
        try:
            # utf-8-sig drops a leading byte-order mark, which would otherwise become an
            # invisible first character of the first label.
            lines = Path(file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read labels file {file}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise UsageError(f"labels file {file} is not UTF-8 text") from e
        raw = [ln for ln in lines if not ln.lstrip().startswith("#")]
    else:
        raw = text.removeprefix(BOM).split(",")  # text pasted from a BOM-marked file
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


def check_distinct_prompts(prompts: list[str], labels: list[str], tokenizer: Any) -> None:
    """Refuse labels whose prompts reach the model as the same tokens.

    The text encoder sees each prompt cut at ``tokenizer.model_max_length`` tokens (77 for
    CLIP); two labels whose prompts only differ after that (a long template, labels with a
    long common start) get identical conditioning, identical scores, and a t-test that can
    never prune either. Words a word-level tokenizer does not know all become one unknown
    token, with the same effect."""
    limit = getattr(tokenizer, "model_max_length", None)
    truncate = limit is not None and limit <= UNSET_MAX_LENGTH
    kw = {"truncation": True, "max_length": limit} if truncate else {"truncation": False}
    # The ids the encoder reads, less the padding (padding equal sequences keeps them equal).
    ids = tokenizer(list(prompts), verbose=False, **kw)["input_ids"]
    seen: dict[tuple[int, ...], int] = {}
    for i, seq in enumerate(ids):
        j = seen.setdefault(tuple(seq), i)
        if j == i:
            continue
        a, b = labels[j], labels[i]
        if truncate:
            full = tokenizer([prompts[j], prompts[i]], truncation=False, verbose=False)["input_ids"]
            if list(full[0]) != list(full[1]):
                raise UsageError(
                    f"labels {a!r} and {b!r} give the same prompt after the tokenizer's {limit}-token "
                    "truncation: shorten the template or the labels")
        raise UsageError(
            f"labels {a!r} and {b!r} give the same tokens to this model (a word-level tokenizer reads "
            "every word it does not know as one unknown token): reword one of them")


def refuse_truncated_duplicates(model: str | None, labels: list[str], prompts: list[str]) -> None:
    """``check_distinct_prompts`` with ``model``'s own tokenizer, before a job is queued;
    skipped when the tokenizer is not on this machine (a hub id not in the local cache:
    the worker downloads the model, and submit must not)."""
    from worker.model_files import load_tokenizer

    tokenizer = load_tokenizer(model)
    if tokenizer is not None:
        check_distinct_prompts(prompts, labels, tokenizer)

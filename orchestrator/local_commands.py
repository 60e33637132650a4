"""In-process commands: ``classify``, ``eval``, ``calibrate``, ``train-demo``.

They run the embedded executor (worker.classifier) in this process: no Redis, no
Postgres. torch is imported inside the commands only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from orchestrator import report
from orchestrator.group import EXIT_FAILED, EXIT_PARTIAL, cli
from orchestrator.settings import Settings
from orchestrator.sources import class_folders, list_local
from worker import config as C
from worker.errors import BadImageError, UsageError
from worker.labels import (check_distinct_prompts, parse_labels, prompts, validate_labels,
                           validate_template)


def scoring_options(f: Callable) -> Callable:
    """Options shared by every command that scores images."""
    opts = [
        click.option("--model", "-m", envvar="DIFFLABEL_MODEL", default="demo", show_default=True,
                     help="Hub id (e.g. stabilityai/stable-diffusion-2-base), local diffusers "
                          "directory, single .safetensors checkpoint, or 'demo' for the bundled digits "
                          "model; `difflabel models` lists the families. Env: DIFFLABEL_MODEL."),
        click.option("--template", "-t", default=None,
                     help="Prompt template with {} where the label goes, e.g. 'a photo of a {}.' "
                          "Default: the model's own template, else 'a photo of a {}.'"),
        click.option("--device", envvar="DIFFLABEL_DEVICE", default=None,
                     help="cpu, cuda or cuda:N. Default: cuda when available, else cpu."),
        click.option("--seed", type=int, default=C.DEFAULT_SEED, show_default=True,
                     help="Seed of the shared noise and timesteps; same seed, same scores."),
        click.option("--weighting", type=click.Choice(C.WEIGHTINGS), default=C.DEFAULT_WEIGHTING,
                     show_default=True,
                     help="heuristic: exp(-c t) on the x0 error (Clark & Jaini; t is sigma for "
                          "flow-matching models such as SD3 and FLUX); uniform: plain epsilon error (Li et "
                          "al.); velocity: plain velocity error (the flow-matching training loss)."),
        click.option("--weight-coef", type=float, default=C.DEFAULT_WEIGHT_COEF, show_default=True,
                     help="The c in exp(-c t)."),
        click.option("--rule", type=click.Choice(C.RULES), default=None,
                     help="Pruning rule. ttest: the paper's paired t-test once every class has "
                          "--min-scores samples. pooled: one screening sample per class keeps the best "
                          "--screen-keep fraction, then a paired test with the variance pooled over the "
                          "item's classes prunes from 2 samples on (about 1.9 evaluations per label at "
                          f"1,000 labels, against 8.9 for ttest). Default: pooled above "
                          f"{C.AUTO_POOLED_ABOVE} labels, else ttest."),
        click.option("--min-scores", type=int, default=None,
                     help="Samples per class before the test may prune "
                          f"(default: {C.RULE_DEFAULTS['ttest']['min_scores']} for ttest, "
                          f"{C.RULE_DEFAULTS['pooled']['min_scores']} for pooled)."),
        click.option("--max-scores", type=int, default=C.DEFAULT_MAX_SCORES, show_default=True,
                     help="Sample budget per class; then the lowest mean score wins."),
        click.option("--p-cutoff", type=float, default=None,
                     help="Prune a class when its paired test's p-value falls below this "
                          f"(default: {C.RULE_DEFAULTS['ttest']['p_cutoff']:g} for ttest, "
                          f"{C.RULE_DEFAULTS['pooled']['p_cutoff']:g} for pooled)."),
        click.option("--screen-keep", type=float, default=C.DEFAULT_SCREEN_KEEP, show_default=True,
                     help="pooled: fraction of the classes the screening round keeps."),
        click.option("--screen-min", type=int, default=C.DEFAULT_SCREEN_MIN, show_default=True,
                     help="pooled: the screening round keeps at least this many classes."),
        click.option("--pool-df", type=float, default=C.DEFAULT_POOL_DF, show_default=True,
                     help="pooled: weight of the pooled variance, in degrees of freedom (0: plain t-test)."),
        click.option("--max-round-evals", type=int, default=C.DEFAULT_MAX_ROUND_EVALS, show_default=True,
                     help="A round of one item scores at most this many (class, sample) pairs; larger "
                          "rounds run as consecutive class ranges on the same noise (0: never split)."),
        click.option("--samples-per-round", type=int, default=None,
                     help="Samples added to each surviving class per round "
                          f"(default: {C.RULE_DEFAULTS['ttest']['samples_per_round']} for ttest, "
                          f"{C.RULE_DEFAULTS['pooled']['samples_per_round']} for pooled)."),
        click.option("--batch-size", type=int, default=C.DEFAULT_BATCH_SIZE, show_default=True,
                     help="Model inputs per forward pass."),
        click.option("--no-prune", is_flag=True,
                     help="Score every class max-scores times (slow; for measurements)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_config(kw: dict[str, Any], n_labels: int) -> C.ScoringConfig:
    rule = kw.pop("rule") or C.rule_for(n_labels)
    return C.ScoringConfig(
        weighting=kw.pop("weighting"), weight_coef=kw.pop("weight_coef"),
        min_scores=kw.pop("min_scores"), max_scores=kw.pop("max_scores"),
        p_cutoff=kw.pop("p_cutoff"), samples_per_round=kw.pop("samples_per_round"),
        batch_size=kw.pop("batch_size"), seed=kw.pop("seed"), prune=not kw.pop("no_prune"),
        rule=rule, screen_keep=kw.pop("screen_keep"), screen_min=kw.pop("screen_min"),
        pool_df=kw.pop("pool_df"), max_round_evals=kw.pop("max_round_evals"),
    )


def engine_settings() -> Settings:
    """The command's settings (the group reads them once from options and environment)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(Settings) if ctx is not None else None
    return found or Settings.from_env()


def load_model(model: str, device: str | None):
    from worker.backends import load_backend

    st = engine_settings()
    click.echo(f"loading model {model} ...", err=True)
    return load_backend(model, device=device or st.device, dtype=st.dtype, compile=st.compile,
                        max_batch=st.max_batch)


def decode_all(paths: list[str], bar) -> tuple[list[tuple[str, Any, str]], list[tuple[str, str]]]:
    """Read and decode every path: (path, image, noise key) for the good ones; bad images
    become (path, reason) and are reported, not fatal."""
    from worker.images import decode
    from worker.noise import content_key

    limit = engine_settings().max_image_pixels
    good, bad = [], []
    for p in paths:
        try:
            try:
                data = Path(p).read_bytes()
            except OSError as e:
                raise BadImageError(f"{p}: cannot read ({e.strerror or e})") from e
            good.append((p, decode(data, name=p, max_pixels=limit), content_key(data)))
        except BadImageError as e:
            bad.append((p, str(e)))
            click.echo(f"warning: skipped {e}", err=True)
            bar.update(1)
    return good, bad


def labelled_images(folder: str, limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """(labels, image paths, true label per path) from a folder with one subfolder per class."""
    classes = class_folders(folder)
    labels = validate_labels([c for c, _ in classes])
    paths, truth = [], []
    for label, files in classes:
        files = files[:limit] if limit else files
        paths += files
        truth += [label] * len(files)
    return labels, paths, truth


def run_classifier(model: str, device: str | None, paths: list[str], labels: list[str],
                   template: str | None, config: C.ScoringConfig, progress: bool = True):
    """Load, decode, classify. Returns (backend, results in path order, failures)."""
    from worker.classifier import classify_images

    backend = load_model(model, device)
    template = validate_template(template or backend.default_template or C.DEFAULT_TEMPLATE)
    texts = prompts(template, labels)
    if getattr(backend, "tokenizer", None) is not None:
        # Prompts the encoder reads as the same tokens give classes that can never be pruned:
        # refuse before any image is scored (the loaded tokenizer, so no second load).
        check_distinct_prompts(texts, labels, backend.tokenizer)
    with report.progress(len(paths), "classifying", progress) as bar:
        good, bad = decode_all(paths, bar)
        results = classify_images(backend, [(p, im) for p, im, _ in good], texts,
                                  labels, config, on_done=lambda r: bar.update(1),
                                  noise_keys=[k for _, _, k in good])
    return backend, template, results, bad


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--labels", "-l", "labels_text", metavar="A,B,C",
              help="Comma-separated labels, e.g. --labels cat,dog,bird.")
@click.option("--labels-file", type=click.Path(dir_okay=False),
              help="A UTF-8 file with one label per line (# starts a comment).")
@scoring_options
@click.option("--output", "-o", type=click.Choice(["table", "json", "jsonl"]), default="table",
              show_default=True, help="table for people; json or jsonl for scripts.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def classify(paths, labels_text, labels_file, output, progress, model, template, device, **kw):
    """Label images in this process (no services needed).

    PATHS are image files and folders (searched recursively for .png, .jpg, .jpeg, .bmp,
    .gif, .webp, .tif). An unreadable file is reported and skipped; the rest are labelled.

    \b
    Examples:
      difflabel classify examples/digits/seven --labels-file examples/digits/labels.txt
      difflabel classify photos/ --labels cat,dog --model ./sd-2-base -o jsonl
    """
    labels = parse_labels(labels_text, labels_file)
    if template is not None:
        validate_template(template)
    config = build_config(kw, len(labels))
    listing = list_local(paths)
    if listing.skipped:
        click.echo(f"note: {len(listing.skipped)} non-image files skipped", err=True)
    if not listing.items:
        raise UsageError(f"no image files found in {', '.join(paths)}")
    _, _, results, bad = run_classifier(model, device, listing.items, labels, template, config,
                                        progress)
    rows = [r.to_dict() for r in results]
    rows += [{"uri": p, "label": None, "confidence": None, "margin": None, "n_evals": 0,
              "status": "failed", "error": reason} for p, reason in bad]
    order = {p: i for i, p in enumerate(listing.items)}
    rows.sort(key=lambda r: order[r["uri"]])
    report.print_rows(rows, output)
    if bad:
        sys.exit(EXIT_FAILED if not results else EXIT_PARTIAL)


@cli.command("eval")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@scoring_options
@click.option("--limit", type=int, default=None, help="Use at most this many images per class.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: accuracy and image count against evaluations per class.")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def eval_(folder, limit, plot, output, progress, model, template, device, **kw):
    """Measure accuracy on a labelled FOLDER (one subfolder per class, named by its label).

    Prints accuracy, mean and median model evaluations per image, expected calibration
    error (ECE) of the confidence, and a confusion matrix.

    \b
    Example:
      difflabel eval examples/digits
      difflabel eval examples/digits -o json --plot eval.png
    """
    labels, paths, truth = labelled_images(folder, limit)
    config = build_config(kw, len(labels))
    backend, template, results, bad = run_classifier(model, device, paths, labels, template, config,
                                                     progress)
    by_path = {r.key: r for r in results}
    summary = report.evaluation(labels, [(by_path.get(p), t) for p, t in zip(paths, truth)],
                                n_failed=len(bad))
    summary.update(model=model, template=template, config=config.to_dict(),
                   calibrated=backend.calibration is not None)
    if plot:
        report.plot_eval(summary, plot)
    if output == "json":
        click.echo(json.dumps(summary))
    else:
        report.print_eval(summary)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@scoring_options
@click.option("--limit", type=int, default=None, help="Use at most this many images per class.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def calibrate(folder, limit, progress, model, template, device, **kw):
    """Fit the confidence calibration on a labelled FOLDER and store it with the model.

    Runs the classifier on FOLDER (one subfolder per class), then fits Platt scaling
    from the classifier's signals (evaluations used, t-test separation, margin) to
    P(correct), and writes calibration.json into the model directory. Use a folder that
    is not your test set.

    \b
    Example:
      difflabel calibrate examples/digits-val --model demo
    """
    from worker import calibration as calib

    labels, paths, truth = labelled_images(folder, limit)
    config = build_config(kw, len(labels))
    backend, _, results, _ = run_classifier(model, device, paths, labels, template, config, progress)
    if backend.path is None:
        raise UsageError(f"model {model!r} has no local directory to store a calibration in")
    truth_of = dict(zip(paths, truth))
    rows = [{"n_evals": r.n_evals, "n_classes": len(labels), "separation": r.separation,
             "margin": r.margin} for r in results]
    correct = [r.label == truth_of[r.key] for r in results]
    if all(correct) or not any(correct):
        raise UsageError(
            f"{sum(correct)} of {len(correct)} images in {folder} were labelled correctly: a calibration "
            "needs both right and wrong answers to fit; use a larger or harder labelled folder")
    before = calib.expected_calibration_error([r.separation for r in results], correct)
    cal = calib.fit(rows, correct)
    probs = [calib.apply(cal, **row) for row in rows]
    cal.update(ece_fit=calib.expected_calibration_error(probs, correct), ece_uncalibrated=before,
               fitted_on=str(folder), config=config.to_dict())
    path = calib.save(cal, backend.path)
    click.echo(f"calibrated on {len(rows)} images (accuracy {sum(correct) / len(rows):.3f}): "
               f"ECE {before:.3f} uncalibrated -> {cal['ece_fit']:.3f} fitted; wrote {path}")


@cli.command("models")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people; json for scripts.")
def models(output):
    """List the model families difflabel classifies with: what each loads, its native
    resolution, and what it predicts.

    A diffusers folder or hub id is recognised by the pipeline its model_index.json names;
    a single .safetensors file (SD 1.x/2.x, SDXL, SD3, FLUX.1) by its weights.

    \b
    Examples:
      difflabel models
      difflabel models -o json
    """
    from worker.families import describe

    rows = describe()
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['family']:<13} {row['title']}")
        click.echo(f"  pipelines   {', '.join(row['pipelines'])}")
        click.echo(f"  loads       {row['loads']}")
        click.echo(f"  resolution  {row['resolution']}")
        click.echo(f"  predicts    {row['target']}")
        click.echo(f"  e.g.        {', '.join(row['examples'])}"
                   + ("  (also single .safetensors files)" if row["single_file"] else ""))
    click.echo("Other pipelines (Kandinsky, video models, upscalers...) are refused with the reason.")


@cli.command("train-demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory. Default: the bundled models/digits.")
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--examples", type=click.Path(file_okay=False), default=None,
              help="Also write the held-out images here as PNGs, one folder per class "
                   "(and the validation slice beside it, as <examples>-val).")
@click.option("--objective", type=click.Choice(["epsilon", "flow"]), default="epsilon", show_default=True,
              help="epsilon: DDPM epsilon prediction (models/digits). flow: flow matching, velocity "
                   "eps - x0 on a FlowMatchEulerDiscreteScheduler grid, scored as SD3 is "
                   "(e.g. --objective flow --augment --out models/digits-flow).")
@click.option("--sigma-sampling", type=click.Choice(["uniform", "logit-normal"]), default="uniform",
              show_default=True,
              help="flow: how training draws sigma on the grid; uniform is what the scorer draws, "
                   "logit-normal is SD3's training density.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Randomly shift (+-1 px), scale (+-10%) and thicken or thin the strokes of half "
                   "the drawn images, on the scans' 0..16 grey levels.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="torch threads for training (0: torch's default), e.g. --threads 2.")
def train_demo(out, steps, batch_size, seed, examples, objective, sigma_sampling, augment, threads):
    """Train the bundled digits demo model from scratch (about 20 minutes on 2 CPU cores).

    Data: scikit-learn's handwritten digits, stratified 60/40 split (random_state 0); the
    40% held out is never trained on. Needs scikit-learn: pip install 'difflabel[train]'.

    \b
    Examples:
      difflabel train-demo --out models/digits
      difflabel train-demo --objective flow --augment --out models/digits-flow
    """
    from tqdm import tqdm

    from worker import demo
    from worker.model_files import demo_model_path
    from worker.training import PixelModelConfig, TrainConfig

    if steps < 1 or batch_size < 1:
        raise UsageError("--steps and --batch-size must be at least 1")
    if out is None and (objective != "epsilon" or augment):
        raise UsageError("the bundled models/digits is the epsilon model without augmentation: pass --out DIR, "
                         "e.g. --out models/digits-flow")
    out_dir = Path(out) if out else demo_model_path()
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, threads=threads,
                       sigma_sampling=sigma_sampling)
    cfg = PixelModelConfig(objective=objective)
    with tqdm(total=steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        meta = demo.train_digits(out_dir, tcfg, cfg, progress=progress, augment=augment)
    t = meta["training"]
    click.echo(f"saved {out_dir}: final loss {t['final_loss']}, {t['seconds'] / 60:.1f} min")
    if examples:
        split = demo.load_split()
        n = demo.export_folder(split.test_x, split.test_y, Path(examples))
        m = demo.export_folder(split.val_x, split.val_y, Path(str(examples).rstrip("/") + "-val"))
        click.echo(f"wrote {n} held-out images to {examples} and {m} validation images beside it")

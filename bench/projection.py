"""Images per hour per GPU for a 10-class and a 1,000-class job at SD-2-base size, from
evaluations per second and evaluations per image, next to the reference implementation's
published figures (issue 6, benchmark 5). A projection: arithmetic on measured inputs.

    images/hour = 3600 * (engine evals/s) / (evals/image)

* engine evals/s: a GPU measurement (``--engine-json bench/results/engine_gpu_sd2.json``,
  written by bench/gpu.sh), or a bare-forward ceiling times the engine efficiency measured on
  CPU (``--ceiling 369 --efficiency 0.95``; 369 evals/s is the issue's measured H100 ceiling for
  SD-2-base at 512 px, batch 256, fp16, eager).
* evals/image, 10 classes: measured on the demo model at the defaults (bench/round_cost.py).
* evals/image, 1,000 classes: measured on the many-label shapes model at K = 1,000
  (``bench/many_labels.py``, ``--many-json bench/results/many_labels.json``): the rule named by
  ``--rule`` (the defaults) next to the paper's t-test as the engine ran it before.
* reference (Li et al. 2023, SD-2-base, A100): 30 s per CIFAR-10 image (about 2,750 UNet
  calls), about 1,000 s per ImageNet image.

    python bench/projection.py --ceiling 369 --efficiency 0.952 --evals-10 80.5 \
        --many-json bench/results/many_labels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_result  # noqa: E402

REFERENCE_S_PER_IMAGE = {10: 30.0, 1000: 1000.0}
REFERENCE_CALLS_10 = 2750


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "this machine's CPU"
    except ImportError:
        return "an unnamed machine"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-json", default=None, help="engine.py's JSON; its sd2-base loop rate is used")
    ap.add_argument("--ceiling", type=float, default=369.0, help="bare-forward evals/s (issue: H100, SD-2-base)")
    ap.add_argument("--efficiency", type=float, default=None, help="engine loop / bare forward")
    ap.add_argument("--evals-10", type=float, required=True, help="evals/image, 10 classes (measured)")
    ap.add_argument("--many-json", default=str(Path(__file__).resolve().parent / "results" / "many_labels.json"),
                    help="many_labels.py's JSON: evals/image at K = 1,000")
    ap.add_argument("--rule", default="pooled (default)", help="the row of --many-json to project")
    ap.add_argument("--baseline", default="t-test (today: min 5, p 0.02)", help="the row to compare with")
    ap.add_argument("--label", default="projection")
    ap.add_argument("--gpu", default=None, help="the GPU the rate was measured on (default: this machine's)")
    ap.add_argument("--tag", default="projection")
    args = ap.parse_args()

    if args.engine_json:
        m = json.loads(Path(args.engine_json).read_text())["sd2-base"]
        rate, source = m["loop_evals_per_s"], f"measured engine loop ({m['dtype']}, batch {m['batch']})"
    else:
        if args.efficiency is None:
            ap.error("give --engine-json or --efficiency")
        rate = args.ceiling * args.efficiency
        source = f"{args.ceiling:g} evals/s bare-forward ceiling x {args.efficiency:.3f} engine efficiency"
    where = "the issue's H100 ceiling" if not args.engine_json else f"measured on {args.gpu or _gpu_name()}"
    many = {(r["K"], r["rule"]): r for r in json.loads(Path(args.many_json).read_text())["rows"]}
    new, old = many[(1000, args.rule)], many[(1000, args.baseline)]
    jobs = [("10 classes (CIFAR-10-like)", 10, args.evals_10, "measured, digits demo model"),
            ("1,000 classes (ImageNet-like)", 1000, new["evals_mean"],
             f"measured, many-label shapes model, {args.rule} ({new['accuracy'] * 100:.1f}% on "
             f"{new['items']} items)"),
            ("1,000 classes (ImageNet-like), before", 1000, old["evals_mean"],
             f"measured, many-label shapes model, {args.baseline} ({old['accuracy'] * 100:.1f}%)")]
    ref_rate = REFERENCE_CALLS_10 / REFERENCE_S_PER_IMAGE[10]  # the reference's own evals/s
    rows = []
    for name, k, evals, how in jobs:
        ours = 3600 * rate / evals
        ref = 3600 / REFERENCE_S_PER_IMAGE[k]
        ref_evals = REFERENCE_CALLS_10 if k == 10 else REFERENCE_S_PER_IMAGE[k] * ref_rate
        rows.append((name, f"{evals:,.0f}", how, f"{rate:,.0f}", f"{ours:,.0f}", f"{ref:,.1f}", f"{ours / ref:,.0f}x",
                     f"{ref_evals:,.0f}{'' if k == 10 else ' (inferred)'}", f"{ref_evals / evals:,.1f}x"))
    table = markdown_table(("job", "evals/image", "evals/image from", "evals/s", "images/hour/GPU (ours)",
                            "reference images/hour (Li et al., A100)", "ours / reference",
                            "reference evals/image", "fewer evals (hardware-neutral)"), rows)
    text = (f"{args.label}: SD-2-base size, 512 px; evals/s from {source}.\n"
            f"Reference: Li et al. 2023, SD-2-base on an A100: 30 s per CIFAR-10 image "
            f"(about {REFERENCE_CALLS_10:,} UNet calls), about 1,000 s per ImageNet image. Our rate is "
            f"{where}; the A100 is slower, so the last two columns\n"
            f"compare evaluations per image, which do not depend on the GPU. The reference's ImageNet\n"
            f"evaluations are inferred: 1,000 s at its CIFAR-10 rate of {ref_rate:.0f} evals/s.\n"
            f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n\n{table}\n")
    write_result(args.tag, text)


if __name__ == "__main__":
    main()

"""Per-step validation curves of any training runs, from their ``training.log``, in one plot.

    python benchmarks/plot_validation.py --output val.png hyperprior=outputs/hp/training.log codec=outputs/run1/training.log

Each run's validation lines (``step N: ... | val loss L bpp B psnr P``) become three panels: loss
(D + lambda R), bpp estimate and PSNR against the training step. The figures are written beside
the plot as JSON.

``--reference LABEL`` also prints what a step of every other run is worth in steps of that one:
at each of the run's validation steps s (every ``--every`` steps), the first step t at which the
reference's best validation loss so far is as low as the run's best so far, and t / s. At equal
training compute the run is ahead where its step costs less than t / s times the reference's
(the step-cost ratio comes from a timing, e.g. ``codec_probes.py step-times``). Compare runs whose
learning-rate schedules have the same length: a shorter cosine reaches its low rates earlier.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import accumulate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from rd_benchmark import plot_validation_logs  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=PATH of a training.log (or of the run folder holding it)")
    p.add_argument("--output", required=True, help="PNG to write (its .json beside it)")
    p.add_argument("--title", default="per-step validation", help="plot title")
    p.add_argument("--reference", default=None, help="LABEL of the run whose steps the others' are counted in (see above)")
    p.add_argument("--every", type=int, default=500, help="with --reference: the steps at which to count")
    return p.parse_args(argv)


def step_equivalence(curve: dict, reference: dict, every: int) -> list[dict]:
    """At the curve's validation steps that are multiples of ``every``: its best validation loss
    so far, the first reference step whose best so far is as low (None where the reference never
    gets there), and their ratio (reference steps per step of the curve)."""
    ref_best = list(accumulate(reference["loss"], min))
    rows = []
    for step, best in zip(curve["step"], accumulate(curve["loss"], min)):
        if step % every:
            continue
        t = next((r for r, b in zip(reference["step"], ref_best) if b <= best), None)
        rows.append({"step": step, "best_loss": best, "reference_step": t, "ratio": t / step if t is not None else None})
    return rows


def report_equivalence(curves: dict, reference: str, every: int) -> None:
    """Add and print ``step_equivalence`` against ``curves[reference]`` for every other curve."""
    if reference not in curves:
        raise SystemExit(f"error: --reference {reference!r} is not one of the runs' labels {sorted(curves)}")
    for label, c in curves.items():
        if label == reference:
            continue
        c["equivalence"] = step_equivalence(c, curves[reference], every)
        print(f"\n{label}: steps of {reference} that reach its best validation loss so far")
        print(f"{'step':>8} {'best loss':>10} {'reference step':>15} {'ratio':>6}")
        for row in c["equivalence"]:
            t = f"{row['reference_step']:.0f}" if row["reference_step"] is not None else "not reached"
            ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
            print(f"{row['step']:>8.0f} {row['best_loss']:>10.6f} {t:>15} {ratio:>6}")


def main(argv) -> dict:
    args = parse_args(argv)
    logs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"error: {spec!r}: expected LABEL=PATH")
        path = Path(path)
        logs[label] = path / "training.log" if path.is_dir() else path
        if not logs[label].is_file():
            raise SystemExit(f"error: {logs[label]} not found")
    curves = plot_validation_logs(logs, Path(args.output), args.title)
    for label, c in curves.items():
        last = f"step {c['step'][-1]:.0f}: loss {c['loss'][-1]:.4f} bpp {c['bpp'][-1]:.3f} psnr {c['psnr'][-1]:.2f}" if c["step"] else "no validation"
        print(f"{label:>32}  {last}")
    if args.reference is not None:
        report_equivalence(curves, args.reference, args.every)
    Path(args.output).with_suffix(".json").write_text(json.dumps(curves, indent=2))
    return curves


if __name__ == "__main__":
    main(sys.argv[1:])

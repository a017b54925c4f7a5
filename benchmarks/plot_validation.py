"""Per-step validation curves of any training runs, from their ``training.log``, in one plot.

    python benchmarks/plot_validation.py --output val.png hyperprior=outputs/hp/training.log codec=outputs/run1/training.log

Each run's validation lines (``step N: ... | val loss L bpp B psnr P``) become three panels: loss
(D + lambda R), bpp estimate and PSNR against the training step. The figures are written beside
the plot as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from rd_benchmark import plot_validation_logs  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=PATH of a training.log (or of the run folder holding it)")
    p.add_argument("--output", required=True, help="PNG to write (its .json beside it)")
    p.add_argument("--title", default="per-step validation", help="plot title")
    return p.parse_args(argv)


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
    Path(args.output).with_suffix(".json").write_text(json.dumps(curves, indent=2))
    for label, c in curves.items():
        last = f"step {c['step'][-1]:.0f}: loss {c['loss'][-1]:.4f} bpp {c['bpp'][-1]:.3f} psnr {c['psnr'][-1]:.2f}" if c["step"] else "no validation"
        print(f"{label:>32}  {last}")
    return curves


if __name__ == "__main__":
    main(sys.argv[1:])

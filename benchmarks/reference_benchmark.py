"""Reference checkpoints: the long-budget training recipe, the shipped codec curve, and its figures.

Trains with the project's training script (resumable over as many sittings as needed; finished
runs are cached, and several copies of the command share the runs through claims, as in
``rd_benchmark.py``: two copies with ``--threads 1`` on a 2-core machine):
- the base run: the codec at ``--base_lambda`` from scratch, for ``--base_steps`` steps of the
  recipe (crops from photographs randomly downscaled by ``--downscale_min``..1, the crop size
  growing by ``--crop_schedule``, bfloat16 autocast, channels-last, Adam with warm-up and cosine);
- every other rate point of ``--lambdas``: fine-tuned from the base run's last checkpoint for
  ``--finetune_steps`` (``--finetune_crop_schedule``, ``--finetune_lr``), the usual way to get a
  family of rate points for a fraction of the cost of training each from scratch;
- CompressAI's ``mbt2018-mean`` of the same N / M at ``--base_lambda``, with the base recipe and
  step count: the long-budget baseline.
Stage 2, where a CUDA GPU is at hand: ``benchmarks/reference_gpu_stage.sh`` trains every rate
point and the baseline from stage 1's checkpoints, all at once on the GPU; with ``--stage2_dir``
(its output folder) the shipped curve and the baseline are taken from there instead.
Ships a slim copy (``bk.slim_checkpoint``) of each codec run's best checkpoint into
``--reference_dir`` (the files the demo and every script load), then measures, with real files:
- on Kodak: the shipped curve, mbt2018-mean, JPEG, WebP and AVIF, with CompressAI's published
  curves of fully trained bmshj2018-hyperprior and mbt2018-mean for scale;
- on photographs the project never trained or tuned on (scikit-image's): the shipped curve, JPEG
  and WebP;
and BD-rates (PSNR and MS-SSIM) of the shipped curve against JPEG and WebP on both. Writes
``reference.json``, ``reference.md``, ``reference_plot.png`` and ``reference_val_curves.png`` (per-step
validation of the base run and the baseline) into ``--results_dir``.

    python benchmarks/reference_benchmark.py --runs_dir ~/lic-runs/reference --threads 1 &
    python benchmarks/reference_benchmark.py --runs_dir ~/lic-runs/reference --threads 1 &
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bk_sdm_compression as bk  # noqa: E402
import evaluate_bk_sdm_compression as ev  # noqa: E402
import lic_common  # noqa: E402
from rd_benchmark import evaluate_cached, export_reference, plot_validation_logs, reference_path, run_dir, train_run  # noqa: E402

CODEC = bk.ARCHITECTURE
BASELINE = "mbt2018-mean"
PUBLISHED = ("compressai-bmshj2018-hyperprior_mse_cuda.json", "compressai-mbt2018-mean_mse_cuda.json")


def run_argv(args, curve: str, lam: float) -> list[str] | None:
    """The training command of one run; None while the base run it starts from is unfinished."""
    argv = ["--data_path", args.train_data, "--output_dir", str(run_dir(args, curve, lam)), "--lambda_rate", str(lam),
            "--image_size", str(args.image_size), "--downscale_min", str(args.downscale_min), "--downscale_max", "1.0",
            "--val_image_size", "256", "--batch_size", str(args.batch_size), "--epochs", "1000000",
            "--epoch_size", str(args.epoch_size), "--num_workers", "0", "--seed", str(args.seed), "--save_every", "0",
            "--no-progress", "--amp"]  # fmt: skip
    if curve == BASELINE:
        argv += ["--model", BASELINE, "--N", str(args.N), "--M", str(args.M)]
    else:
        argv += ["--N", str(args.N), "--M", str(args.M), "--diffusion_steps", str(args.diffusion_steps),
                 "--unet_channels", str(args.unet_channels)]  # fmt: skip
    if curve == BASELINE or lam == args.base_lambda:
        return argv + ["--crop_schedule", args.crop_schedule, "--lr", str(args.lr), "--warmup_steps", str(args.warmup_steps),
                       "--max_steps", str(args.base_steps)]  # fmt: skip
    base = run_dir(args, CODEC, args.base_lambda)
    if not (base / "done.json").is_file():
        return None
    return argv + ["--crop_schedule", args.finetune_crop_schedule, "--lr", str(args.finetune_lr), "--warmup_steps",
                   str(args.finetune_warmup_steps), "--max_steps", str(args.finetune_steps),
                   "--init_from", str(base / "last_checkpoint.pth")]  # fmt: skip


def train_all(args) -> None:
    """Every run not finished and not claimed by another copy: the base run and the baseline
    first, then the fine-tuned rate points."""
    order = [(CODEC, args.base_lambda), (BASELINE, args.base_lambda)]
    order += [(CODEC, lam) for lam in args.lambdas if lam != args.base_lambda]
    for curve, lam in order:
        if (run_dir(args, curve, lam) / "done.json").is_file():
            continue
        argv = run_argv(args, curve, lam)
        if argv is None:
            print(f"== {curve}, lambda_rate {lam:g}: waits for the base run", flush=True)
            continue
        ship = (lambda: export_reference(args, lam)) if curve == CODEC else None
        train_run(run_dir(args, curve, lam), f"{curve}, lambda_rate {lam:g}", lambda: argv, ship)


def source_dir(args, curve: str, lam: float) -> Path:
    """The run whose checkpoint is measured (and shipped): stage 2's where ``--stage2_dir`` is
    given, else stage 1's."""
    return run_dir(argparse.Namespace(runs_dir=args.stage2_dir), curve, lam) if args.stage2_dir else run_dir(args, curve, lam)


def finished(args, curve: str) -> list[float]:
    lams = [args.base_lambda] if curve == BASELINE else args.lambdas
    return [lam for lam in lams if (source_dir(args, curve, lam) / "done.json").is_file()]


def ship_curve(args) -> dict[float, Path]:
    """Make ``--reference_dir`` hold exactly the shipped curve: a slim copy of each finished codec
    run's best checkpoint (written only where the file there differs, so its evaluation cache
    stays valid), and no other codec checkpoint (an older curve's files are removed)."""
    shipped = {}
    for lam in finished(args, CODEC):
        path = reference_path(args, lam)
        best = lic_common.load_checkpoint(source_dir(args, CODEC, lam) / "best_checkpoint.pth")
        slim = bk.slim_checkpoint(best)
        old = lic_common.load_checkpoint(path) if path.is_file() else None
        same = old is not None and old.get("config") == slim["config"] and old["state_dict"].keys() == slim["state_dict"].keys() and all(
            torch.equal(old["state_dict"][k], v) for k, v in slim["state_dict"].items())  # fmt: skip
        if not same:
            lic_common.save_checkpoint(slim, path)
            print(f"shipped {path} (from {source_dir(args, CODEC, lam)})")
        shipped[lam] = path
    for stale in sorted(set(Path(args.reference_dir).glob(f"{CODEC}-lambda*.pth")) - set(shipped.values())):
        stale.unlink()
        print(f"removed {stale}: not a finished run of this curve")
    return shipped


def measure(args, device) -> dict[str, list[ev.ImageResult]]:
    """{"kodak": ..., "unseen": ...}: results of every finished run (the shipped files) and of the
    Pillow codecs."""
    shipped = [(ev.LearnedCodec(CODEC, f"lambda{lam:g}", bk.load_codec(path)[0], device), path) for lam, path in ship_curve(args).items()]
    baseline = []
    for lam in finished(args, BASELINE):
        ckpt = source_dir(args, BASELINE, lam) / "best_checkpoint.pth"
        model = ev.load_learned(str(ckpt), argparse.Namespace(bk_sdm_path=None, diffusion_steps=None))
        baseline.append((ev.LearnedCodec(f"{BASELINE} (same recipe)", f"lambda{lam:g}", model, device), ckpt))
    pillow = {name: [(ev.PillowCodec(name, q), None) for q in ev.DEFAULT_QUALITIES[name]] for name in ("jpeg", "webp", "avif")}
    results_dir = Path(args.results_dir)
    kodak = lic_common.list_images(args.kodak)[: args.max_images or None]
    unseen = lic_common.write_sample_photos(results_dir / "unseen_photos")
    return {
        "kodak": evaluate_cached(shipped + baseline + sum(pillow.values(), []), kodak, results_dir / "reference_eval_cache.json", device),
        "unseen": evaluate_cached(shipped + pillow["jpeg"] + pillow["webp"], unseen, results_dir / "reference_eval_cache_unseen.json", device),
    }


def bd_against(curves: dict, anchors=("jpeg", "webp")) -> dict:
    """BD-rates (PSNR, MS-SSIM) of the shipped curve against each anchor."""
    if CODEC not in curves:
        return {}
    return {a: ev.bd_rates(curves, a)[CODEC] for a in anchors if a in curves}


def report(results: dict[str, list[ev.ImageResult]], args) -> dict:
    out = Path(args.results_dir)
    kodak, unseen = ev.curves_from_results(results["kodak"]), ev.curves_from_results(results["unseen"])
    published = [json.loads((Path(args.published) / name).read_text()) for name in PUBLISHED if (Path(args.published) / name).is_file()]
    for p in published:
        p["name"] = f"{p['name']} (published, fully trained)"
    summary = {
        "kodak": {"images": len({r.image for r in results["kodak"]}), "curves": kodak, "bd_rate": bd_against(kodak)},
        "unseen": {"images": sorted({r.image for r in results["unseen"]}), "curves": unseen, "bd_rate": bd_against(unseen)},
        "runs": {f"{curve}/lambda{lam:g}": json.loads((source_dir(args, curve, lam) / "done.json").read_text())
                 for curve in (CODEC, BASELINE) for lam in finished(args, curve)},  # fmt: skip
        "published": [p["name"] for p in published],
    }
    logs = {curve: source_dir(args, curve, args.base_lambda) / "training.log" for curve in (CODEC, BASELINE)}
    logs = {curve: log for curve, log in logs.items() if log.is_file()}
    stage = "stage 2" if args.stage2_dir else "the base run and the baseline"
    title = f"lambda_rate {args.base_lambda:g}: per-step validation, {stage} (same recipe)"
    summary["validation"] = plot_validation_logs(logs, out / "reference_val_curves.png", title)
    n = summary["kodak"]["images"]
    ev.plot_rd(kodak, out / "reference_plot.png", published=published, title=f"Kodak ({n} images): the shipped reference checkpoints")
    lic_common.write_text_atomic(out / "reference.json", json.dumps(summary, indent=2))
    text = markdown(summary)
    lic_common.write_text_atomic(out / "reference.md", text)
    print(text)
    return summary


def markdown(summary: dict) -> str:
    def fmt(v: float) -> str:
        return "n/a" if np.isnan(v) else f"{v:+.1f}%"

    lines = [f"Kodak, {summary['kodak']['images']} images, real files:", "",
             "| curve | point | bpp | PSNR dB | MS-SSIM |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, c in summary["kodak"]["curves"].items():
        if label in ("jpeg", "webp", "avif"):
            continue
        r = c["results"]
        for i, point in enumerate(r["points"]):
            lines.append(f"| {label} | {point} | {r['bpp'][i]:.3f} | {r['psnr-rgb'][i]:.2f} | {r['ms-ssim-rgb'][i]:.4f} |")
    for where in ("kodak", "unseen"):
        bd = summary[where]["bd_rate"]
        images = summary[where]["images"]
        what = f"Kodak ({images} images)" if where == "kodak" else f"unseen photographs ({', '.join(images)})"
        for anchor, v in bd.items():
            lines.append(f"\nBD-rate of the shipped curve vs {anchor} on {what}: PSNR {fmt(v['bd_rate_psnr'])}, "
                         f"MS-SSIM {fmt(v['bd_rate_ms_ssim'])}")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_data", default=str(ROOT.parent / "shared" / "data" / "train"), help="training images")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="evaluation images")
    p.add_argument("--published", default=str(ROOT.parent / "shared" / "data" / "published"), help="CompressAI's published results JSON, for scale")
    p.add_argument("--runs_dir", default=str(ROOT / "benchmarks" / "runs" / "reference"), help="training runs (resumable; keep them outside the work tree)")
    p.add_argument("--stage2_dir", default=None, help="output folder of benchmarks/reference_gpu_stage.sh: measure and ship its finished runs instead of stage 1's")
    p.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"), help="figures and the evaluation caches")
    p.add_argument("--reference_dir", default=str(ROOT / "reference_checkpoints"), help="where the shipped checkpoints go")
    p.add_argument("--lambdas", type=float, nargs="+", default=[8.5e-3, 4.4e-3, 2.3e-3, 1.2e-3, 6.2e-4, 3.2e-4], help="rate points (CompressAI qualities 1..6)")
    p.add_argument("--base_lambda", type=float, default=1.2e-3, help="the rate point trained from scratch (the others start from it)")
    p.add_argument("--N", type=int, default=128, help="channels (codec and baseline)")
    p.add_argument("--M", type=int, default=192, help="latent channels (codec and baseline)")
    p.add_argument("--diffusion_steps", type=int, default=4, help="the codec's reverse steps")
    p.add_argument("--unet_channels", type=int, default=32, help="the codec's U-Net width")
    p.add_argument("--base_steps", type=int, default=16000, help="steps of the base run and of the baseline")
    p.add_argument("--crop_schedule", default="128,256@13000", help="crop size by step of the base run and the baseline")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the base run and the baseline")
    p.add_argument("--warmup_steps", type=int, default=500, help="warm-up of the base run and the baseline")
    p.add_argument("--finetune_steps", type=int, default=3000, help="steps of each fine-tuned rate point")
    p.add_argument("--finetune_crop_schedule", default="128,256@2000", help="crop size by step of the fine-tuned rate points")
    p.add_argument("--finetune_lr", type=float, default=1e-4, help="peak learning rate of the fine-tuned rate points")
    p.add_argument("--finetune_warmup_steps", type=int, default=100, help="warm-up of the fine-tuned rate points")
    p.add_argument("--image_size", type=int, default=128, help="first crop size (the schedules say the rest)")
    p.add_argument("--downscale_min", type=float, default=0.5, help="crops come from photographs downscaled by a random factor in [this, 1]")
    p.add_argument("--batch_size", type=int, default=8, help="crops per step")
    p.add_argument("--epoch_size", type=int, default=1600, help="crops per epoch (validation after each)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max_images", type=int, default=0, help="evaluate on the first N Kodak images only (0: all 24)")
    p.add_argument("--training", default=True, action=argparse.BooleanOptionalAction, help="train what is not finished (--no-training: only evaluate)")
    p.add_argument("--evaluate", default=True, action=argparse.BooleanOptionalAction, help="measure and report what is finished (--no-evaluate: only train)")
    args = p.parse_args(argv)
    if args.base_lambda not in args.lambdas:
        p.error("--base_lambda must be one of --lambdas")
    return args


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    if args.training:
        train_all(args)
    if not args.evaluate:
        return {}
    if not finished(args, CODEC):
        print("no finished codec run yet: nothing to measure")
        return {}
    return report(measure(args, torch.device("cpu")), args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Rate-distortion benchmark on Kodak, every curve measured in the same run.

Trains, with the project's own training script and under one fixed budget per rate point:
- the from-scratch diffusion-hyperprior codec ("diffusion-hyperprior");
- the same codec with the diffusion switched off, trained that way ("no-diffusion");
- CompressAI's bmshj2018-hyperprior, mbt2018-mean (the same mean-scale hyperprior: the fair
  baseline) and mbt2018 (plus a serial spatial context: what context is worth) of the same N / M;
then measures them on Kodak with real bitstreams, together with the codec's checkpoints decoded
with 0 steps ("diffusion-hyperprior@0steps": what the steps contribute on the same weights) and
without the final denoising step when it was trained with one ("diffusion-hyperprior@nodenoise"),
and JPEG, WebP and AVIF through Pillow. Prints BD-rates against each baseline, and writes ``rd_kodak.json``,
``per_image.csv``, ``rd_plot.png`` and ``val_curves.png`` (per-step validation of every curve at
one rate point) into ``--results_dir``.

The budget is equal training compute: each model trains for as many steps as it completes in
``--budget_minutes`` of its own measured step time (``step_budgets``), so a faster model gets more
steps, and other work on the machine changes how long a run takes but not what it trains.
Training runs are resumable and finished runs and evaluations are cached: the command can be
run again, over several sittings, and only does what is missing. A run being trained is claimed
(``claim.json`` in its folder), so several copies of the command can share the runs: on a 2-core
machine, two copies with ``--threads 1`` train two runs at a time; on one GPU (``--device cuda``,
step budgets timed there) as many copies as it holds.

    python benchmarks/rd_benchmark.py --train_data ../shared/data/train --kodak ../shared/data/kodak
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import evaluate_bk_sdm_compression as ev  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402

CODEC_CURVES = ("diffusion-hyperprior", "no-diffusion")
COMPRESSAI_CURVES = ("bmshj2018-hyperprior", "mbt2018-mean", "mbt2018")
CURVES = (*CODEC_CURVES, *COMPRESSAI_CURVES)  # training order within a rate point


def curve_flags(curve: str, args: argparse.Namespace) -> list[str]:
    common = ["--amp" if args.amp else "--no-amp", "--compile" if args.compile else "--no-compile"]
    if curve in COMPRESSAI_CURVES:
        return ["--model", curve, *common]
    steps = args.diffusion_steps if curve == "diffusion-hyperprior" else 0
    denoise = ["--latent_denoise" if args.latent_denoise and steps else "--no-latent_denoise"]
    return ["--diffusion_steps", str(steps), "--unet_channels", str(args.unet_channels), *denoise, *common,
            "--teacher_forcing", args.teacher_forcing]


def run_dir(args, curve: str, lam: float) -> Path:
    return Path(args.runs_dir) / curve / f"lambda{lam:g}"


def step_budgets(args: argparse.Namespace) -> dict[str, int]:
    """Steps each curve may train: ``--budget_minutes`` of its measured training compute.

    Each model's step (forward, loss, backward, both optimizers; batch and crop of the runs) is
    timed on random data, the three models interleaved, and its fastest time is kept: the minimum
    is what the machine can do when nothing else runs, so the budget does not shrink when other
    work shares the machine (wall and CPU clocks both do: busy OpenMP threads spin). Cached in
    ``step_budgets.json`` with the sizes it was measured for; other sizes are timed again. Copies
    of the command started together time once: the others wait on ``step_budgets.lock`` and read
    what the first wrote.
    """
    path = Path(args.results_dir) / "step_budgets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _timed_step_budgets(args, path)


def _timed_step_budgets(args: argparse.Namespace, path: Path) -> dict[str, int]:
    setup = {k: getattr(args, k) for k in ("N", "M", "diffusion_steps", "unet_channels", "latent_denoise", "teacher_forcing", "image_size", "batch_size", "budget_minutes", "amp", "compile")}
    setup["curves"] = list(CURVES)
    setup["device"] = device_name(args.device)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("setup") == setup:
            return cached["steps"]
        print(f"{path} was measured for {cached.get('setup', 'unrecorded sizes')}, not {setup}: timing again")
    models = {}
    for curve in CURVES:
        train_args = tr.parse_args(["--data_path", ".", "--N", str(args.N), "--M", str(args.M), *curve_flags(curve, args)])
        torch.manual_seed(args.seed)
        models[curve] = tr.set_training_options(tr.build_model(tr.model_config(train_args)), train_args).to(args.device)
        if args.compile:  # timed as it trains (the first, compiling step is not counted)
            models[curve] = torch.compile(models[curve])
    criterion = tr.RateDistortionLoss(args.lambdas[0])
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    times = tr.time_training_steps(models, criterion, x, args.timing_steps, lr=args.lr, amp=args.amp)
    seconds = {curve: min(t[1:]) for curve, t in times.items()}  # the first step warms up
    steps = {curve: max(1, int(args.budget_minutes * 60 / s)) for curve, s in seconds.items()}  # 0 would mean "no limit"
    lic_common.write_text_atomic(path, json.dumps({"seconds_per_step": seconds, "steps": steps, "threads": torch.get_num_threads(),
                                                   "setup": setup}, indent=2))  # fmt: skip
    print(f"step budgets for {args.budget_minutes} minutes of training compute: {steps} (seconds per step {seconds})")
    return steps


def device_name(device: str) -> str:
    """What the step budgets were timed on: "cpu", or the GPU's name (budgets do not carry over)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (boot id and clock ticks since boot), to tell it from a later
    process given the same pid; None where /proc cannot say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, after the command name
    except (OSError, IndexError):
        return None


def _alive(claim: dict) -> bool:
    if claim.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked, so it is respected
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = claim.get("started")
    return started is None or started == _process_start(int(claim["pid"]))


@contextmanager
def claimed(out: Path):
    """Yield True if this process may train the run in ``out`` (it then holds ``claim.json``).

    A claim left by a process that is gone (killed, machine restarted) is taken over.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "claim.json"
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                other = {}  # being written, or half-written by a process that died
            if other and _alive(other):
                yield False
                return
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def train_run(out: Path, label: str, make_argv: Callable[[], list[str]], ship: Callable[[], Path] | None = None) -> dict | None:
    """Train the run in ``out`` with the training script's ``make_argv()`` (called only when this
    process trains it), resuming where it was interrupted; cached in ``done.json`` with the command
    and, with ``ship``, the checkpoint ``ship()`` exports. Returns None, without training, when
    another process is training it (see ``claimed``)."""
    done = out / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    with claimed(out) as mine:
        if not mine:
            print(f"== {label}: being trained by another process ({out / 'claim.json'}), skipped", flush=True)
            return None
        if done.is_file():  # finished by another process between the two checks
            return json.loads(done.read_text())
        argv = make_argv()
        if (out / "last_checkpoint.pth").is_file():
            argv += ["--resume", "last"]
        print(f"== training {label}", flush=True)
        result = tr.main(argv)
        result["command"] = "python train_bk_sdm_compression.py " + " ".join(argv)
        if ship is not None:
            result["reference_checkpoint"] = str(ship())
        lic_common.write_text_atomic(done, json.dumps(result, indent=2))
        return result


def train_point(args: argparse.Namespace, curve: str, lam: float) -> dict | None:
    """Train one rate point to its budget (see ``train_run``)."""
    ship = (lambda: export_reference(args, lam)) if curve == "diffusion-hyperprior" else None
    return train_run(run_dir(args, curve, lam), f"{curve}, lambda_rate {lam:g}", lambda: _train_argv(args, curve, lam), ship)


def _train_argv(args: argparse.Namespace, curve: str, lam: float) -> list[str]:
    if args.budget_clock == "steps":
        budget = ["--max_steps", str(step_budgets(args)[curve])]
    else:
        budget = ["--time_budget", str(args.budget_minutes), "--budget_clock", args.budget_clock]
    print(f"== {curve}, lambda_rate {lam:g}: budget {' '.join(budget)}", flush=True)
    return ["--data_path", args.train_data, "--output_dir", str(run_dir(args, curve, lam)), "--N", str(args.N), "--M", str(args.M),
            "--lambda_rate", str(lam), "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
            "--lr", str(args.lr), "--warmup_steps", str(args.warmup_steps), "--epochs", "1000000",
            "--epoch_size", str(args.epoch_size), *budget, "--num_workers", "0", "--seed", str(args.seed),
            "--save_every", "0", "--no-progress", "--device", args.device, *curve_flags(curve, args)]  # fmt: skip


def reference_path(args: argparse.Namespace, lam: float) -> Path:
    folder = Path(args.reference_dir) if args.reference_dir else Path(args.runs_dir) / "slim"
    return folder / f"diffusion-hyperprior-lambda{lam:g}.pth"


def export_reference(args: argparse.Namespace, lam: float) -> Path:
    """A slim copy (``bk.slim_checkpoint``) of a codec run's best checkpoint, to ship. The
    benchmark measures this file, so the figures are those of what ships."""
    path = reference_path(args, lam)
    best = run_dir(args, "diffusion-hyperprior", lam) / "best_checkpoint.pth"
    lic_common.save_checkpoint(bk.slim_checkpoint(lic_common.load_checkpoint(best)), path)
    return path


def codecs_to_measure(args, device) -> list[tuple[ev.Codec, Path | None]]:
    """Every finished run's model (with the checkpoint file it was loaded from) and the Pillow codecs."""
    codecs: list[tuple[ev.Codec, Path | None]] = []
    for curve in CURVES:
        for lam in args.lambdas:
            if not (run_dir(args, curve, lam) / "done.json").is_file():
                continue
            point, ckpt = f"lambda{lam:g}", run_dir(args, curve, lam) / "best_checkpoint.pth"
            if curve in COMPRESSAI_CURVES:
                model = ev.load_learned(str(ckpt), argparse.Namespace(bk_sdm_path=None, diffusion_steps=None))
                codecs.append((ev.LearnedCodec(curve, point, model, device), ckpt))
                continue
            if curve == "diffusion-hyperprior":
                ckpt = reference_path(args, lam)
                if not ckpt.is_file():
                    export_reference(args, lam)
                codecs.append((ev.LearnedCodec(f"{curve}@0steps", point, bk.load_codec(ckpt, diffusion_steps=0)[0], device), ckpt))
            model = bk.load_codec(ckpt)[0]
            if curve == "diffusion-hyperprior" and model.latent_denoise:
                plain = bk.load_codec(ckpt)[0]
                plain.latent_denoise = False
                codecs.append((ev.LearnedCodec(f"{curve}@nodenoise", point, plain, device), ckpt))
            codecs.append((ev.LearnedCodec(curve, point, model, device), ckpt))
    for name in ("jpeg", "webp", "avif"):
        codecs += [(ev.PillowCodec(name, q), None) for q in ev.DEFAULT_QUALITIES[name]]
    return codecs


def measure(args, device) -> list[ev.ImageResult]:
    """Every codec on every Kodak image (cached, see ``evaluate_cached``)."""
    files = lic_common.list_images(args.kodak)[: args.max_images or None]
    return evaluate_cached(codecs_to_measure(args, device), files, Path(args.results_dir) / "eval_cache.json", device)


def evaluate_cached(codecs: list[tuple[ev.Codec, Path | None]], files: list[Path], cache_path: Path, device) -> list[ev.ImageResult]:
    """``ev.evaluate`` of each codec on ``files``, its results cached in ``cache_path`` under the
    codec's label, point, the image count and, for a learned codec, its checkpoint file's name and
    mtime (a retrained checkpoint is measured again)."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    results = []
    for codec, ckpt in codecs:
        key = f"{codec.label}|{codec.point}|{len(files)}" + (f"|{ckpt.name}|{ckpt.stat().st_mtime_ns}" if ckpt else "")
        if key not in cache:
            eval_args = argparse.Namespace(batch_size=1, save_samples=False, progress=False, output_dir=str(cache_path.parent))
            cache[key] = [asdict(r) for r in ev.evaluate([codec], files, eval_args, device)]
            lic_common.write_text_atomic(cache_path, json.dumps(cache))
        results += [ev.ImageResult(**r) for r in cache[key]]
    return results


def report(results: list[ev.ImageResult], args) -> dict:
    curves = ev.curves_from_results(results)
    anchors = [a for a in ("jpeg", "webp", *COMPRESSAI_CURVES, "no-diffusion", "diffusion-hyperprior@0steps",
                           "diffusion-hyperprior@nodenoise") if a in curves]  # fmt: skip
    bd = {anchor: ev.bd_rates(curves, anchor) for anchor in anchors}
    coding = {}  # where the bits go, per learned curve: totals over all its points and images
    for label in sorted({r.curve for r in results if not (np.isnan(r.bpp_estimate) or np.isnan(r.bpp_table))}):
        real, est, table = (sum(getattr(r, f) for r in results if r.curve == label) for f in ("bpp", "bpp_estimate", "bpp_table"))
        coding[label] = {"real_over_estimate": real / est - 1, "real_over_table": real / table - 1, "table_over_estimate": table / est - 1}
    summary = {
        "images": sorted({r.image for r in results}),
        "budget": f"{args.budget_minutes} minutes ({args.budget_clock}) per rate point",
        "step_budgets": json.loads((Path(args.results_dir) / "step_budgets.json").read_text()) if args.budget_clock == "steps" else None,
        "lambdas": args.lambdas, "curves": curves, "bd_rate": bd,
        "bits": coding,
        "roundtrip_mismatches": sum(r.roundtrip_matches_forward is False for r in results),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    out = Path(args.results_dir)
    summary["validation"] = plot_validation_curves(args, out / "val_curves.png")
    lic_common.write_text_atomic(out / "rd_kodak.json", json.dumps(summary, indent=2))
    ev.write_per_image_csv(results, out / "per_image.csv")
    ev.plot_rd(curves, out / "rd_plot.png", title=f"Kodak ({len(summary['images'])} images), {summary['budget']}")

    text = markdown(summary)
    lic_common.write_text_atomic(out / "rd_kodak.md", text)
    print(text)
    return summary


VAL_LINE = re.compile(r"step (\d+): .*\| val loss ([\d.]+) bpp ([\d.]+) psnr ([\d.]+)")


def validation_curve(log: Path) -> dict[str, list[float]]:
    """Per-step validation (loss, bpp estimate, PSNR) from a run's training.log."""
    rows = [tuple(map(float, m.groups())) for m in map(VAL_LINE.search, log.read_text().splitlines()) if m]
    return {k: [r[i] for r in rows] for i, k in enumerate(("step", "loss", "bpp", "psnr"))}


def plot_validation_logs(logs: dict[str, Path], path: Path, title: str) -> dict[str, dict]:
    """Validation loss, bpp and PSNR against training step, one line per run's training.log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: validation_curve(log) for name, log in logs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in curves.items():
        for ax, key in zip(axes, ("loss", "bpp", "psnr")):
            ax.plot(c["step"], c[key], label=name)
    for ax, label in zip(axes, ("validation loss (D + lambda R)", "validation bpp (estimate)", "validation PSNR (dB)")):
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(3, len(curves)), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(curves) / 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves


def plot_validation_curves(args: argparse.Namespace, path: Path) -> dict:
    """Per-step validation of every curve at one rate point (``--val_curves_lambda``)."""
    lam = args.val_curves_lambda or args.lambdas[len(args.lambdas) // 2]
    logs = {c: run_dir(args, c, lam) / "training.log" for c in CURVES if (run_dir(args, c, lam) / "training.log").is_file()}
    if not logs:
        return {}
    curves = plot_validation_logs(logs, path, f"lambda_rate {lam:g}: per-step validation, equal training compute per curve")
    return {"lambda": lam, "curves": curves}


def markdown(summary: dict) -> str:
    """The report as Markdown tables (``rd_kodak.md``, printed too; the README's Results copy it)."""
    lines = [f"Kodak, {len(summary['images'])} images; budget {summary['budget']}.", "",
             "| curve | point | bpp (file) | bpp (estimate) | PSNR dB | MS-SSIM | encode s | decode s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, c in summary["curves"].items():
        r = c["results"]
        for i, point in enumerate(r["points"]):
            est = r["bpp-estimate"][i]
            lines.append(f"| {label} | {point} | {r['bpp'][i]:.4f} | {'' if np.isnan(est) else f'{est:.4f}'} | {r['psnr-rgb'][i]:.2f} "
                         f"| {r['ms-ssim-rgb'][i]:.4f} | {r['encoding_time'][i]:.3f} | {r['decoding_time'][i]:.3f} |")  # fmt: skip
    anchors = list(summary["bd_rate"])
    if anchors:
        lines += ["", "BD-rate in % (PSNR / MS-SSIM; negative: fewer bits at equal quality; n/a: the curves do not overlap "
                  "or one has a single point):", "", "| curve | " + " | ".join(f"vs {a}" for a in anchors) + " |",
                  "| --- |" + " --- |" * len(anchors)]  # fmt: skip

        def fmt(v: float) -> str:
            return "n/a" if np.isnan(v) else f"{v:+.1f}"

        for label in summary["curves"]:
            cells = [f"{fmt(t[label]['bd_rate_psnr'])} / {fmt(t[label]['bd_rate_ms_ssim'])}" if a != label else "-"
                     for a, t in summary["bd_rate"].items()]  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if summary["bits"]:
        lines += ["", "Where the bits go (all points and images; files with their headers; the table ideal is the code "
                  "length a perfect coder would reach with the range coder's own CDF tables):", "",
                  "| curve | file over estimate | file over table ideal (coder + header) | table ideal over estimate |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for label, b in summary["bits"].items():
            lines.append(f"| {label} | {b['real_over_estimate']:+.2%} | {b['real_over_table']:+.2%} | {b['table_over_estimate']:+.2%} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_data", default=str(ROOT.parent / "shared" / "data" / "train"), help="training images")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="evaluation images")
    p.add_argument("--runs_dir", default=str(ROOT / "benchmarks" / "runs"), help="training runs (resumable)")
    p.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"), help="figures and the evaluation cache")
    p.add_argument("--reference_dir", default=None, help="where the slim copies of the codec's checkpoints (the files measured) go; default: RUNS_DIR/slim (the shipped reference_checkpoints/ are reference_benchmark.py's)")
    p.add_argument("--budget_minutes", type=float, default=10.0, help="training budget per rate point")
    p.add_argument("--budget_clock", default="steps", choices=("steps", "wall", "process"), help="steps: the step count each model does in --budget_minutes of measured training compute; or a wall / process-CPU time budget")
    p.add_argument("--timing_steps", type=int, default=6, help="timed training steps per model for the step budget")
    p.add_argument("--lambdas", type=float, nargs="+", default=[2.3e-3, 1.2e-3, 6.2e-4], help="lambda_rate of the rate points (CompressAI q3, q4, q5)")
    p.add_argument("--curves", nargs="+", default=list(CURVES), choices=CURVES, help="which learned curves to train")
    p.add_argument("--val_curves_lambda", type=float, default=None, help="rate point whose per-step validation curves are plotted (default: the middle of --lambdas)")
    p.add_argument("--N", type=int, default=64, help="channels (all learned models)")
    p.add_argument("--M", type=int, default=96, help="latent channels (all learned models)")
    p.add_argument("--diffusion_steps", type=int, default=4, help="reverse steps of the diffusion curve")
    p.add_argument("--unet_channels", type=int, default=32, help="U-Net width")
    p.add_argument("--latent_denoise", action=argparse.BooleanOptionalAction, default=False, help="train the codec with the final denoising step (measured without it too)")
    p.add_argument("--teacher_forcing", default="all", choices=("all", "sampled"), help="the codec's teacher forcing: every reverse step per image, or one sampled step (see train_bk_sdm_compression.py)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="train every model under bfloat16 autocast (entropy models in fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="train every model with torch.compile (step budgets timed compiled)")
    p.add_argument("--image_size", type=int, default=128, help="training crop (64 px crops give 4x4 latents, where every context is all border)")
    p.add_argument("--batch_size", type=int, default=8, help="batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up, then cosine over the budget)")
    p.add_argument("--warmup_steps", type=int, default=200, help="learning-rate warm-up")
    p.add_argument("--epoch_size", type=int, default=800, help="crops per epoch (validation after each)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of training, step timing and evaluation (on one GPU, several copies of the command share it, as on the CPU)")
    p.add_argument("--max_images", type=int, default=0, help="evaluate on the first N Kodak images only (0: all 24)")
    p.add_argument("--training", default=True, action=argparse.BooleanOptionalAction, help="train the runs not finished yet (--no-training: only evaluate those that are)")
    p.add_argument("--evaluate", default=True, action=argparse.BooleanOptionalAction, help="measure the finished runs on Kodak and report (--no-evaluate: only train)")
    return p.parse_args(argv)


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    if args.training:
        for lam in args.lambdas:
            for curve in args.curves:
                train_point(args, curve, lam)
    if not args.evaluate:
        return {}
    return report(measure(args, torch.device(args.device)), args)


if __name__ == "__main__":
    main(sys.argv[1:])

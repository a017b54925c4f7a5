"""Student-decoder benchmark: its gap to the teacher on Kodak and on unseen photographs, per stage.

1. the teacher, CompressAI's bmshj2018-factorized at the recipe's operating point (quality 8's
   lambda_rate 8.5e-5; N / M as close to quality 8's 192 / 320 as the machine allows), trained by
   the project's training script with the long-run recipe (crops of randomly downscaled
   photographs, bfloat16, a step budget; resumable over several sittings), or a given checkpoint
   (``--teacher_checkpoint``, e.g. the shipped one);
2. ``distill`` and ``finetune`` of the student on crops made on the fly (random positions of the
   training photographs downscaled by a random factor), with per-epoch validation curves;
3. on Kodak and on scikit-image's photographs (never trained on), for the student as initialised,
   after distillation and after fine-tuning: PSNR / MS-SSIM of teacher and student (the student
   decoding the teacher's real bitstreams), the gap, and the checkerboard energy of both; and a
   crop of one Kodak image (original / teacher / student / both error maps), enlarged.

Every stage is cached in ``--work_dir`` (a finished stage is not run again; an interrupted one
resumes). Writes ``--output`` (JSON), ``student_curves.png`` and ``student_crops.png`` beside it.

    python benchmarks/student_benchmark.py --work_dir ~/lic-runs/student
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evaluate_bk_sdm_compression as ev  # noqa: E402
import finetune_after_distill as fd  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402
from rd_benchmark import evaluate_cached  # noqa: E402

STAGES = ("initialised", "distilled", "finetuned")


def cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    result = fn()
    lic_common.write_text_atomic(path, json.dumps(result, indent=2, default=str))
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_data", default=str(ROOT.parent / "shared" / "data" / "train"), help="training images")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="evaluation images")
    p.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs" / "student"), help="teacher run, student checkpoints (keep it outside the work tree)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "student.json"), help="the figures (pictures go beside it)")
    p.add_argument("--teacher_checkpoint", default=None, help="use this bmshj2018-factorized checkpoint instead of training one")
    p.add_argument("--ship_dir", default=str(ROOT / "reference_checkpoints" / "student"), help="where slim copies of the trained teacher and the fine-tuned student go (the figures are measured on them)")
    p.add_argument("--N", type=int, default=128, help="teacher channels")
    p.add_argument("--M", type=int, default=320, help="teacher latent channels")
    p.add_argument("--lambda_rate", type=float, default=8.5e-5, help="teacher rate weight (CompressAI quality 8)")
    p.add_argument("--teacher_steps", type=int, default=12000, help="teacher training steps")
    p.add_argument("--teacher_lr", type=float, default=2e-4, help="teacher peak learning rate")
    p.add_argument("--teacher_crop", type=int, default=128, help="teacher training crops")
    p.add_argument("--distill_epochs", type=int, default=30, help="distillation epochs")
    p.add_argument("--finetune_epochs", type=int, default=20, help="fine-tuning epochs")
    p.add_argument("--crops_per_epoch", type=int, default=400, help="student crops per epoch (random photographs, positions and downscales)")
    p.add_argument("--warmup_steps", type=int, default=30, help="student learning-rate warm-up steps")
    p.add_argument("--crop_size", type=int, default=128, help="student training crops (the teacher trains at 128 px too)")
    p.add_argument("--batch_size", type=int, default=8, help="student and teacher batch")
    p.add_argument("--lr", type=float, default=1e-4, help="student learning rate (distillation; fine-tuning too unless --finetune_lr)")
    p.add_argument("--finetune_lr", type=float, default=None, help="student learning rate of the fine-tuning stage (default: --lr)")
    p.add_argument("--downscale_min", type=float, default=0.5, help="crops come from photographs downscaled by a random factor in [this, 1]")
    p.add_argument("--max_images", type=int, default=0, help="evaluate on the first N Kodak images (0: all)")
    p.add_argument("--picture_image", default="kodim13.png", help="Kodak image of the enlarged crop (the first image if absent)")
    p.add_argument("--error_gain", type=float, default=0.0, help="gain of the picture's error maps (0: the teacher's 99th-percentile error at full scale)")
    p.add_argument("--picture_box", type=int, nargs=3, default=(256, 320, 64), metavar=("TOP", "LEFT", "SIZE"), help="the crop in that image")
    p.add_argument("--published", default=str(ROOT.parent / "shared" / "data" / "published" / "compressai-bmshj2018-factorized_mse_cuda.json"),
                   help="CompressAI's published bmshj2018-factorized results (its quality 8 point is the operating point)")  # fmt: skip
    p.add_argument("--jpeg_qualities", type=int, nargs="+", default=[75, 85, 90, 95], help="JPEG / WebP qualities around the teacher's rate")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def teacher_argv(args, out: Path) -> list[str]:
    return ["--model", "bmshj2018-factorized", "--N", str(args.N), "--M", str(args.M), "--data_path", args.train_data,
            "--output_dir", str(out), "--lambda_rate", str(args.lambda_rate), "--image_size", str(args.teacher_crop),
            "--downscale_min", str(args.downscale_min), "--downscale_max", "1.0", "--val_image_size", "256",
            "--batch_size", str(args.batch_size), "--lr", str(args.teacher_lr), "--warmup_steps", "300", "--epochs", "1000000",
            "--epoch_size", "1600", "--max_steps", str(args.teacher_steps), "--num_workers", "0", "--seed", "0",
            "--save_every", "0", "--no-progress", "--amp"]  # fmt: skip


def train_teacher(args, work: Path) -> tuple[str, str]:
    """(checkpoint, command): the given checkpoint, or the benchmark's own teacher run."""
    if args.teacher_checkpoint:
        return args.teacher_checkpoint, f"given: {args.teacher_checkpoint}"
    out = work / "teacher"
    argv = teacher_argv(args, out)
    resume = ["--resume", "last"] if (out / "last_checkpoint.pth").is_file() else []
    cached(work / "teacher_done.json", lambda: tr.main(argv + resume))
    return str(out / "best_checkpoint.pth"), "python train_bk_sdm_compression.py " + " ".join(argv)


def ship(args, teacher_ckpt: str, student_ckpt: Path) -> tuple[str, Path]:
    """Slim copies of the teacher (unless it was given) and of the fine-tuned student's decoder."""
    ship_dir = Path(args.ship_dir)
    teacher_out = teacher_ckpt
    if not args.teacher_checkpoint:
        ckpt = lic_common.load_checkpoint(teacher_ckpt)
        teacher_out = str(ship_dir / "bmshj2018-factorized-teacher.pth")
        # the entropy model stays fp32, so its tables (and the bitstreams) are exactly the trained teacher's
        coder = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("entropy_bottleneck.")}
        state = lic_common.half_where_exact({k: v for k, v in ckpt["state_dict"].items() if k not in coder}) | coder
        lic_common.save_checkpoint({"architecture": ckpt["architecture"], "model_args": ckpt["model_args"], "state_dict": state}, teacher_out)
    student_out = ship_dir / "student-decoder.pth"
    lic_common.save_checkpoint(fd.slim_student(lic_common.load_checkpoint(student_ckpt)), student_out)
    return teacher_out, student_out


def operating_point(args, work: Path, teacher: dict) -> dict:
    """The teacher's Kodak point beside JPEG and WebP at its rate (PSNR interpolated in log bpp
    between the measured qualities) and CompressAI's published quality-8 point."""
    files = lic_common.list_images(args.kodak)[: args.max_images or None]
    codecs = [(ev.PillowCodec(name, q), None) for name in ("jpeg", "webp") for q in args.jpeg_qualities]
    curves = ev.curves_from_results(evaluate_cached(codecs, files, work / "classical_eval_cache.json", torch.device("cpu")))
    point = {"teacher": {"bpp": teacher["bpp"], "psnr": teacher["teacher_psnr"], "ms_ssim": teacher["teacher_ms_ssim"]}}
    for name, c in curves.items():
        r = c["results"]
        order = sorted(range(len(r["bpp"])), key=lambda i: r["bpp"][i])
        bpp, psnr = [r["bpp"][i] for i in order], [r["psnr-rgb"][i] for i in order]
        inside = bpp[0] <= teacher["bpp"] <= bpp[-1]
        at_rate = float(np.interp(np.log(teacher["bpp"]), np.log(bpp), psnr)) if inside else float("nan")
        point[name] = {"psnr_at_teacher_bpp": at_rate, "qualities": args.jpeg_qualities, "bpp": bpp, "psnr": psnr}
    published = Path(args.published)
    if published.is_file():
        r = json.loads(published.read_text())["results"]
        point["published_quality8"] = {"bpp": r["bpp"][-1], "psnr": r["psnr-rgb"][-1]}
    return point


def plot_curves(work: Path, path: Path) -> dict:
    """Per-epoch validation of both stages: student against its target and against the originals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = {stage: json.loads((work / d / f"{stage}_history.json").read_text())
               for stage, d in (("distill", "checkpoints"), ("finetune", "checkpoints_ft")) if (work / d / f"{stage}_history.json").is_file()}  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    offset = 0
    for stage, rows in history.items():
        steps = [offset + r["step"] for r in rows]
        axes[0].plot(steps, [r["val/psnr_vs_original"] for r in rows], "o-", ms=3, label=f"{stage}: student vs original")
        axes[1].plot(steps, [r["val/psnr"] for r in rows], "o-", ms=3, label=f"{stage}: student vs its target")
        offset = steps[-1] if steps else offset
    for ax, title in zip(axes, ("validation PSNR against the originals (dB)", "validation PSNR against the stage's target (dB)")):
        ax.set_title(title)
        ax.set_xlabel("student training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return history


@torch.no_grad()
def crop_picture(args, teacher_ckpt: str, student_ckpt: Path, path: Path) -> dict:
    """Original / teacher / student / |teacher error| / |student error| of one crop, enlarged 4x
    without interpolation so single pixels and a checkerboard stay visible. Both error maps share
    one gain: ``--error_gain``, or where that is 0, the one that maps the teacher's 99th-percentile
    error to full scale."""
    files = lic_common.list_images(args.kodak)[: args.max_images or None]
    image = next((f for f in files if f.name == args.picture_image), files[0])
    teacher = fd.load_teacher(argparse.Namespace(teacher_checkpoint=teacher_ckpt, quality=8))
    student = fd.make_student(teacher)
    fd.load_student(student, student_ckpt)
    student.update(force=True)
    x = lic_common.load_image(image)[None]
    h, w = x.shape[-2:]
    xp = torch.nn.functional.pad(x, (0, (-w) % 16, 0, (-h) % 16))
    enc = teacher.compress(xp)
    t_hat = teacher.decompress(enc["strings"], enc["shape"])["x_hat"][..., :h, :w].clamp(0, 1)
    s_hat = student.eval().decompress(enc["strings"], enc["shape"])["x_hat"][..., :h, :w].clamp(0, 1)
    top, left, size = args.picture_box
    top, left, size = min(top, h - 1), min(left, w - 1), min(size, h, w)
    top, left = min(top, h - size), min(left, w - size)

    def crop(t):
        return t[0, :, top : top + size, left : left + size]

    t_err, s_err = (crop(t_hat) - crop(x)).abs(), (crop(s_hat) - crop(x)).abs()
    gain = args.error_gain or 1.0 / max(torch.quantile(t_err.flatten(), 0.99).item(), 1e-6)
    panels = [crop(x), crop(t_hat), crop(s_hat), t_err.mul(gain).clamp(0, 1), s_err.mul(gain).clamp(0, 1)]
    big = [torch.nn.functional.interpolate(p[None], scale_factor=4, mode="nearest")[0] for p in panels]
    row = torch.cat([torch.nn.functional.pad(p, (4, 4, 4, 4), value=1.0) for p in big], dim=-1)
    lic_common.save_image(row, path)
    return {"image": image.name, "box": [top, left, size], "error_gain": gain,
            "panels": ["original", "teacher", "student", f"|teacher - original| x{gain:.1f}", f"|student - original| x{gain:.1f}"]}


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher_ckpt, teacher_command = train_teacher(args, work)
    teacher = ["--teacher_checkpoint", str(Path(teacher_ckpt).resolve())]
    stage = ["--coco_dir", args.train_data, "--use_prepared", "false", "--val_ratio", "0.1", "--crop_size", str(args.crop_size),
             "--crops_per_epoch", str(args.crops_per_epoch), "--downscale_min", str(args.downscale_min),
             "--batch_size", str(args.batch_size), "--warmup_steps", str(args.warmup_steps),
             "--recon_every", "10", "--num_workers", "0", "--no-progress", "--recon_count", "4", *teacher]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)  # the recipe's default save dirs (./checkpoints, ./checkpoints_ft) land in the work dir
    try:
        finetune_lr = args.lr if args.finetune_lr is None else args.finetune_lr
        for name, epochs, lr, last in (("distill", args.distill_epochs, args.lr, "checkpoints/last.pt"),
                                       ("finetune", args.finetune_epochs, finetune_lr, "checkpoints_ft/ft_last.pt")):  # fmt: skip
            resume = ["--resume"] if (work / last).is_file() else []
            cached(work / f"{name}_done.json", lambda: fd.main([name, *stage, "--lr", str(lr), "--epochs", str(epochs), *resume]))
    finally:
        os.chdir(cwd)
    shipped_teacher, shipped_student = ship(args, teacher_ckpt, work / "checkpoints_ft" / "ft_best.pt")
    teacher = ["--teacher_checkpoint", str(Path(shipped_teacher).resolve())]
    students = {"initialised": [], "distilled": ["--checkpoint", str(work / "checkpoints" / "best_msssim.pt")],
                "finetuned": ["--checkpoint", str(shipped_student)]}  # fmt: skip
    unseen = lic_common.write_sample_photos(work / "unseen_photos")
    result = {"teacher_command": teacher_command, "teacher_checkpoint": shipped_teacher, "student_checkpoint": str(shipped_student),
              "kodak": {}, "unseen": {}}  # fmt: skip
    for name, ckpt in students.items():
        result["kodak"][name] = fd.main(["eval", "--data_path", args.kodak, *teacher, "--max_images", str(args.max_images), *ckpt])
        result["unseen"][name] = fd.main(["eval", "--data_path", str(unseen[0].parent), *teacher, *ckpt])
    result["operating_point"] = operating_point(args, work, result["kodak"]["initialised"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["curves"] = plot_curves(work, out.parent / "student_curves.png")
    result["picture"] = crop_picture(args, shipped_teacher, shipped_student, out.parent / "student_crops.png")
    print(f"\n{'student':<12}{'where':<8}{'gap to teacher (dB)':>21}{'MS-SSIM s - t':>15}{'checkerboard s / t (dB)':>26}")
    for where in ("kodak", "unseen"):
        for name in STAGES:
            r = result[where][name]
            print(f"{name:<12}{where:<8}{r['psnr_gap_db']:>21.3f}{r['student_ms_ssim'] - r['teacher_ms_ssim']:>+15.4f}"
                  f"{r['student_checkerboard_db']:>14.2f} / {r['teacher_checkerboard_db']:.2f}")  # fmt: skip
    op = result["operating_point"]
    print(f"teacher on Kodak: {op['teacher']['bpp']:.3f} bpp, {op['teacher']['psnr']:.2f} dB; at that rate JPEG "
          f"{op['jpeg']['psnr_at_teacher_bpp']:.2f} dB, WebP {op['webp']['psnr_at_teacher_bpp']:.2f} dB"
          + (f"; published quality 8: {op['published_quality8']['bpp']:.3f} bpp, {op['published_quality8']['psnr']:.2f} dB"
             if "published_quality8" in op else ""))  # fmt: skip
    lic_common.write_text_atomic(out, json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

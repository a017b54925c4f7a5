"""Student-decoder benchmark: its PSNR gap to the teacher on Kodak, and the checkerboard measure.

1. trains the teacher, CompressAI's bmshj2018-factorized, with the project's training script
   (``--teacher_minutes`` of training on ``--train_data``);
2. ``prepare``s 224x224 crops of the same images, then runs ``distill`` and ``finetune``;
3. evaluates on Kodak the student as initialised (before any training), after distillation and
   after fine-tuning: PSNR / MS-SSIM of teacher and student, the student decoding the teacher's
   bitstreams, and the checkerboard energy of both.

Every stage is cached in ``--work_dir`` (a finished stage is not run again).

    python benchmarks/student_benchmark.py --train_data ../shared/data/train --kodak ../shared/data/kodak
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune_after_distill as fd  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402


def cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    result = fn()
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train_data", default=str(ROOT.parent / "shared" / "data" / "train"), help="training images")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="evaluation images")
    p.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs" / "student"), help="teacher run, crops, checkpoints")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "student.json"), help="the figures")
    p.add_argument("--teacher_minutes", type=float, default=15.0, help="teacher training budget (process CPU minutes)")
    p.add_argument("--N", type=int, default=64, help="teacher channels")
    p.add_argument("--M", type=int, default=96, help="teacher latent channels")
    p.add_argument("--lambda_rate", type=float, default=1.2e-3, help="teacher rate weight (CompressAI quality 4)")
    p.add_argument("--distill_epochs", type=int, default=30, help="distillation epochs")
    p.add_argument("--finetune_epochs", type=int, default=20, help="fine-tuning epochs")
    p.add_argument("--warmup_steps", type=int, default=30, help="student learning-rate warm-up steps")
    p.add_argument("--crop_size", type=int, default=224, help="student training crops")
    p.add_argument("--batch_size", type=int, default=8, help="student batch")
    p.add_argument("--lr", type=float, default=1e-4, help="student learning rate")
    p.add_argument("--max_images", type=int, default=0, help="evaluate on the first N Kodak images (0: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / "teacher"
    teacher_argv = ["--model", "bmshj2018-factorized", "--N", str(args.N), "--M", str(args.M), "--data_path", args.train_data,
                    "--output_dir", str(teacher_dir), "--lambda_rate", str(args.lambda_rate), "--image_size", "64",
                    "--batch_size", "16", "--lr", "5e-4", "--warmup_steps", "200", "--epochs", "1000000", "--epoch_size", "1600",
                    "--time_budget", str(args.teacher_minutes), "--budget_clock", "process", "--num_workers", "0",
                    "--save_every", "0", "--no-progress"] + (["--resume", "last"] if (teacher_dir / "last_checkpoint.pth").is_file() else [])  # fmt: skip
    cached(work / "teacher_done.json", lambda: tr.main(teacher_argv))
    teacher = ["--teacher_checkpoint", str(teacher_dir / "best_checkpoint.pth")]
    crops = work / "crops"
    cached(work / "prepare_done.json", lambda: fd.main(["prepare", "--coco_dir", args.train_data, "--out_dir", str(crops),
                                                          "--val_ratio", "0.1", "--crop_size", str(args.crop_size), "--no-progress"]))  # fmt: skip
    stage = ["--coco_dir", str(crops), "--crop_size", str(args.crop_size), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
             "--warmup_steps", str(args.warmup_steps), "--recon_every", "10",
             "--num_workers", "0", "--no-progress", "--recon_count", "4", *teacher]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(work)  # the recipe's default save dirs (./checkpoints, ./checkpoints_ft) land in the work dir
    try:
        cached(work / "distill_done.json", lambda: fd.main(["distill", *stage, "--epochs", str(args.distill_epochs)]))
        cached(work / "finetune_done.json", lambda: fd.main(["finetune", *stage, "--epochs", str(args.finetune_epochs)]))
    finally:
        os.chdir(cwd)
    evaluate = ["eval", "--data_path", args.kodak, *teacher, "--max_images", str(args.max_images)]
    result = {
        "teacher_command": "python train_bk_sdm_compression.py " + " ".join(teacher_argv),
        "initialised": fd.main(evaluate),
        "distilled": fd.main([*evaluate, "--checkpoint", str(work / "checkpoints" / "best_msssim.pt")]),
        "finetuned": fd.main([*evaluate, "--checkpoint", str(work / "checkpoints_ft" / "ft_best.pt")]),
    }
    print(f"\n{'student':<12}{'PSNR gap to teacher (dB)':>26}{'student checkerboard dB':>25}{'teacher checkerboard dB':>25}")
    for name in ("initialised", "distilled", "finetuned"):
        r = result[name]
        print(f"{name:<12}{r['psnr_gap_db']:>26.3f}{r['student_checkerboard_db']:>25.2f}{r['teacher_checkerboard_db']:>25.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

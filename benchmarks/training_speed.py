"""Training throughput of the recipe: images / s of a training step before and after each speed-up.

For the codec and CompressAI's ``mbt2018-mean`` of the same N / M, interleaved step by step in one
run (same machine state): fp32, bfloat16 autocast (``--amp``), and bfloat16 with the channels-last
memory format (``--channels_last``). Each figure is the median step of ``--steps`` after one
warm-up step, on a random batch of ``--batch_size`` crops of ``--crop`` px. Beside it, what the
data pipeline delivers on one process (``--num_workers 0``: decoded images cached, a random
downscale, crop and flip per item), so a reader can see whether loading can stall a step. And the
student decoder's distillation step (``finetune_after_distill.py``: the teacher's reconstruction
as target, the student's ``g_s`` trained under bfloat16), its ``UpsampleConv`` layers computed
literally (upsample, then the 5x5 convolution) and in the phase form they use, interleaved.

    python benchmarks/training_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import finetune_after_distill as fd  # noqa: E402
import lic_common  # noqa: E402  (before CompressAI: it imports it without a FutureWarning)
from compressai.models import FactorizedPrior  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402

PARTS = ("codec", "data", "student")
VARIANTS = {"fp32": {"amp": False}, "bf16": {"amp": True}, "bf16 + channels_last": {"amp": True, "channels_last": True}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--N", type=int, default=128, help="channels of both models")
    p.add_argument("--M", type=int, default=192, help="latent channels of both models")
    p.add_argument("--unet_channels", type=int, default=32, help="the codec's U-Net width")
    p.add_argument("--diffusion_steps", type=int, default=4, help="the codec's reverse steps")
    p.add_argument("--crop", type=int, default=128, help="training crop side")
    p.add_argument("--batch_size", type=int, default=8, help="crops per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per model and variant (after one warm-up step)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--train_data", default=str(ROOT.parent / "shared" / "data" / "train"), help="images for the data-pipeline figure")
    p.add_argument("--downscale_min", type=float, default=0.5, help="the data pipeline's random downscale range")
    p.add_argument("--student_N", type=int, default=128, help="channels of the student's teacher (bmshj2018-factorized)")
    p.add_argument("--student_M", type=int, default=320, help="latent channels of the student's teacher")
    p.add_argument("--student_batch_size", type=int, default=8, help="crops per student step (--crop px)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to time")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "training_speed.json"), help="where the figures go")
    return p.parse_args(argv)


def build_models(args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "diffusion-hyperprior": bk.create_diffusion_hyperprior_model(args.N, args.M, args.diffusion_steps, unet_channels=args.unet_channels),
        "mbt2018-mean": tr.build_model({"architecture": "mbt2018-mean", "N": args.N, "M": args.M}),
    }


def step_throughput(args) -> dict[str, dict[str, float]]:
    models, settings = {}, {}
    for name, model in build_models(args).items():
        for variant, opts in VARIANTS.items():
            m = copy.deepcopy(model)
            if opts.get("channels_last"):
                m = m.to(memory_format=torch.channels_last)
            models[f"{name} | {variant}"], settings[f"{name} | {variant}"] = m, opts
    x = torch.rand(args.batch_size, 3, args.crop, args.crop)
    times = tr.time_training_steps(models, tr.RateDistortionLoss(1e-3), x, args.steps + 1, settings=settings)
    result: dict[str, dict[str, float]] = {}
    for key, t in times.items():
        name, variant = key.split(" | ")
        result.setdefault(name, {})[variant] = args.batch_size / statistics.median(t[1:])
    return result


def data_throughput(args) -> float:
    files = lic_common.list_images(args.train_data)
    data = tr.ImageFolderCrops(files, args.crop, train=True, cache_mb=4096, downscale=(args.downscale_min, 1.0))
    for i in range(len(files)):  # decode once: the cache is what a long run sees
        data[(i, 0, args.crop)]
    n = 4 * len(files)
    start = time.perf_counter()
    for i in range(n):
        data[(i % len(files), i + 1, args.crop)]
    return n / (time.perf_counter() - start)


def student_throughput(args) -> dict[str, float]:
    """Images / s of the student's distillation step, literal and phase form (same weights)."""
    torch.manual_seed(0)
    teacher = FactorizedPrior(args.student_N, args.student_M).eval()
    phase = fd.make_student(teacher)
    literal = copy.deepcopy(phase)
    for module in literal.g_s:
        if isinstance(module, fd.UpsampleConv):
            module.forward = types.MethodType(nn.Sequential.forward, module)
    x = torch.rand(args.student_batch_size, 3, args.crop, args.crop)
    state = {}
    for name, student in {"upsample then conv": literal, "phase form": phase}.items():
        fd.set_trainable(student.train(), "distill")
        state[name] = (student, torch.optim.Adam([q for q in student.parameters() if q.requires_grad], 1e-4), [])
    for _ in range(args.steps + 1):
        for student, opt, times in state.values():
            start = time.perf_counter()
            target = fd.reconstruct(teacher, x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x_hat = fd.reconstruct(student, x)
            loss = F.l1_loss(x_hat.float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
    return {name: args.student_batch_size / statistics.median(times[1:]) for name, (_, _, times) in state.items()}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"device": "cpu", "threads": args.threads, "batch_size": args.batch_size, "crop": args.crop, "N": args.N, "M": args.M}
    if "codec" in args.parts:
        steps = result["images_per_second"] = step_throughput(args)
        print(f"training images / s ({args.batch_size} x {args.crop} px, N={args.N}, M={args.M}, {args.threads} threads):")
        print(f"{'model':<22}" + "".join(f"{v:>22}" for v in VARIANTS) + f"{'speed-up':>10}")
        for name, row in steps.items():
            print(f"{name:<22}" + "".join(f"{row[v]:>22.2f}" for v in VARIANTS) + f"{row['bf16 + channels_last'] / row['fp32']:>9.2f}x")
    if "data" in args.parts:
        result["data_crops_per_second"] = data_throughput(args)
        print(f"data pipeline, one process: {result['data_crops_per_second']:.0f} crops / s")
    if "student" in args.parts:
        result.update(student_N=args.student_N, student_M=args.student_M, student_batch_size=args.student_batch_size)
        student = result["student_images_per_second"] = student_throughput(args)
        literal, phase = student["upsample then conv"], student["phase form"]
        print(f"student distillation step ({args.student_batch_size} x {args.crop} px, N={args.student_N}, M={args.student_M}, bfloat16): "
              f"upsample then conv {literal:.2f} img/s, phase form {phase:.2f} img/s ({phase / literal:.2f}x)")  # fmt: skip
    result["command"] = "python benchmarks/training_speed.py " + " ".join(argv)
    lic_common.write_text_atomic(args.output, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

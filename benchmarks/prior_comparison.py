"""Entropy models compared on the same frozen latents, each trained until its validation loss
stops improving or its budget ends, then measured with real bitstreams.

The question: on latents that do not change (a trained codec's analysis transform, frozen), how
many bits does the diffusion prior need against the mean-scale hyperprior (Minnen et al. 2018,
``mbt2018-mean``'s) and against CompressAI's context models, the checkerboard (He et al. 2021) and
ELIC's uneven channel groups with a checkerboard in each (He et al. 2022)?

For each rate point (a codec checkpoint; its g_a and g_s are ``mbt2018-mean``'s layers) the frozen
g_a's latents of ``--cache_latents`` training crops (random downscales, positions, flips) are
computed once, and every entropy model trains on those same (N, M, 16, 16) latents with loss =
bpp (the distortion does not depend on it), starting from the checkpoint's h_a, h_s and entropy
bottleneck, with the same batch, Adam learning rate, warm-up and cosine decay over the same
budget of process CPU time, validated on the same held-out latents every ``--epoch_size`` latents
and stopped by ``--patience``:

    mean-scale            the codec with 0 reverse steps: mu0, sigma0 of h_s code all of y
    diffusion-prior       the codec's masked-diffusion prior, 4 steps, checkerboard reveal
    diffusion-8           8 steps, checkerboard reveal          (``--variants``, first rate point... all)
    diffusion-channels-4  4 steps, channel-slice reveal
    checkerboard          compressai.latent_codecs.CheckerboardLatentCodec, Cheng2020AnchorCheckerboard's
                          context and parameter layers at the latent's M channels
    elic                  compressai.latent_codecs.ChannelGroupsLatentCodec in ELIC's configuration:
                          groups 16, 16, 32, 64, M - 128, a checkerboard in each, Elic2022Official's layers

The codec's priors train through ``train_bk_sdm_compression.py --init_transforms CKPT --freeze g_a
g_s --cache_latents N``; CompressAI's with the loop below, on the same cached latents. Then every
model codes Kodak and photographs the project has never seen: bpp from the entropy-coded bytes
(the payload of every string; the codec's file header is left out for all), PSNR of the frozen
synthesis transform's picture of the decoded latent beside it (the means shift the
reconstruction slightly). The first image of each set is also decoded from its bytes and must
give the encoder's latent. The codec's priors code with their exact integer form, CompressAI's
in floating point.

    python benchmarks/prior_comparison.py --data_path ../shared/data/train --kodak ../shared/data/kodak \\
        --work_dir runs/prior_comparison

Results: ``benchmarks/results/prior_comparison.{json,md,png}`` (curves by name as
``rd_kodak.json`` lays them out, ``bd_rate`` by anchor then curve, the validation curves). Every
finished training run and measurement is kept in ``--work_dir``: a second call continues.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import bk_sdm_compression as bk  # noqa: E402
import evaluate_bk_sdm_compression as ev  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as train  # noqa: E402

CODEC_PRIORS = {  # name: train_bk_sdm_compression.py flags
    "mean-scale": ["--diffusion_steps", "0"],
    "diffusion-prior": ["--diffusion_steps", "4", "--reveal", "checkerboard"],
    "diffusion-8": ["--diffusion_steps", "8", "--reveal", "checkerboard"],
    "diffusion-channels-4": ["--diffusion_steps", "4", "--reveal", "channels"],
}
COMPRESSAI_PRIORS = ("checkerboard", "elic")
PRIORS = (*CODEC_PRIORS, *COMPRESSAI_PRIORS)
DEFAULT_CHECKPOINTS = [str(ROOT / "reference_checkpoints" / f"diffusion-hyperprior-lambda{lam}.pth") for lam in ("0.0085", "0.0023", "0.00062")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=DEFAULT_CHECKPOINTS, help="codec checkpoints whose frozen transforms make the rate points")
    p.add_argument("--data_path", required=True, help="training photographs (crops for the latents; a share held out for validation)")
    p.add_argument("--kodak", required=True, help="folder of the Kodak images (measurement only)")
    p.add_argument("--work_dir", required=True, help="runs, latents and measurements (a second call continues)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "prior_comparison"), help="results path without suffix (.json, .md, .png)")
    p.add_argument("--priors", nargs="+", default=["mean-scale", "diffusion-prior", "checkerboard", "elic"], choices=PRIORS, help="entropy models at every rate point")
    p.add_argument("--variants", nargs="*", default=["diffusion-8", "diffusion-channels-4"], choices=PRIORS, help="entropy models at the middle rate point only")
    p.add_argument("--cache_latents", type=int, default=2048, help="training crops whose latents every model trains on")
    p.add_argument("--image_size", type=int, default=256, help="crop size (latents of size / 16)")
    p.add_argument("--downscale_min", type=float, default=0.5, help="crops from photographs downscaled by a random factor in [this, 1]")
    p.add_argument("--batch_size", type=int, default=16, help="latents per step")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (cosine decay over the budget)")
    p.add_argument("--minutes", type=float, default=10.0, help="process CPU minutes (all threads) each model may train")
    p.add_argument("--epoch_size", type=int, default=1024, help="latents between validations")
    p.add_argument("--patience", type=int, default=4, help="stop after this many validations without improvement")
    p.add_argument("--max_images", type=int, default=0, help="measure on the first this many images of each set (0: all)")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True, help="also measure on scikit-image's photographs")
    p.add_argument("--anchor", default="mean-scale", choices=PRIORS, help="BD-rate anchor of the summary table")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of every run")
    args = p.parse_args(argv)
    if len(args.checkpoints) < 1 or any(not Path(c).is_file() for c in args.checkpoints):
        p.error("--checkpoints: every one must be a codec checkpoint file")
    for name in ("cache_latents", "batch_size", "epoch_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not (args.minutes > 0 and args.lr > 0 and 0 < args.downscale_min <= 1):
        p.error("need --minutes > 0, --lr > 0 and 0 < --downscale_min <= 1")
    return args


# ---- Training ----


def point_name(checkpoint: str) -> str:
    return Path(checkpoint).stem.removeprefix("diffusion-hyperprior-")


def codec_flags(args: argparse.Namespace, checkpoint: str, out: Path, cache: Path) -> list[str]:
    """The train script's flags every codec prior shares at one rate point."""
    config = lic_common.load_checkpoint(checkpoint)["config"]
    return ["--data_path", args.data_path, "--output_dir", str(out), "--init_transforms", checkpoint, "--freeze", "g_a", "g_s",
            "--N", str(config["N"]), "--M", str(config["M"]), "--unet_channels", str(config["unet_channels"]),
            "--cache_latents", str(args.cache_latents), "--latent_cache", str(cache), "--image_size", str(args.image_size),
            "--val_image_size", str(args.image_size), "--downscale_min", str(args.downscale_min), "--batch_size", str(args.batch_size),
            "--lr", str(args.lr), "--epoch_size", str(args.epoch_size), "--epochs", "100000", "--time_budget", str(args.minutes),
            "--budget_clock", "process", "--patience", str(args.patience), "--warmup_steps", "50", "--no-amp", "--no-progress",
            "--num_workers", "0", "--save_every", "0", "--seed", str(args.seed)]  # fmt: skip


def validation_curve(run: Path) -> list[list[float]]:
    """[[step, validation bpp], ...] from a run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [[e.step, e.value] for e in acc.Scalars("val/bpp")]


def train_codec_prior(args, checkpoint: str, name: str, run: Path, cache: Path) -> dict:
    done = run / "done.json"
    if not done.is_file():
        resume = ["--resume", "last"] if (run / "last_checkpoint.pth").is_file() else []
        summary = train.main([*codec_flags(args, checkpoint, run, cache), *CODEC_PRIORS[name], *resume])
        lic_common.write_text_atomic(done, json.dumps(summary | {"curve": validation_curve(run)}))
    return json.loads(done.read_text())


def compressai_prior(kind: str, codec: bk.DiffusionHyperprior) -> nn.Module:
    """CompressAI's checkerboard or ELIC-style latent codec on the codec's latent (M channels),
    with copies of its h_a, h_s and entropy bottleneck (h_s gives scales, then means, as
    CompressAI's parameter layers take them)."""
    from compressai.latent_codecs import (ChannelGroupsLatentCodec, CheckerboardLatentCodec, GaussianConditionalLatentCodec,
                                          HyperLatentCodec, HyperpriorLatentCodec)  # fmt: skip
    from compressai.layers import CheckerboardMaskedConv2d, sequential_channel_ramp
    from compressai.models.base import CompressionModel
    from compressai.models.utils import conv

    M = codec.config.M
    parts = copy.deepcopy(nn.ModuleList([codec.entropy_bottleneck, codec.h_a, codec.h_s]))
    hyper = HyperLatentCodec(entropy_bottleneck=parts[0], h_a=parts[1], h_s=parts[2])

    def checkerboard(channels: int, params_in: int, entropy_parameters: nn.Module | None = None):
        return CheckerboardLatentCodec(
            latent_codec={"y": GaussianConditionalLatentCodec(quantizer="ste")},
            context_prediction=CheckerboardMaskedConv2d(channels, 2 * channels, kernel_size=5, stride=1, padding=2),
            entropy_parameters=entropy_parameters or sequential_channel_ramp(
                params_in, 2 * channels, min_ch=2 * M, num_layers=3, interp="linear", make_layer=nn.Conv2d,
                make_act=lambda: nn.ReLU(inplace=True), kernel_size=1, stride=1, padding=0),
        )  # fmt: skip

    if kind == "checkerboard":  # Cheng2020AnchorCheckerboard's layers with N -> M
        y = checkerboard(M, 4 * M, nn.Sequential(nn.Conv2d(4 * M, 10 * M // 3, 1), nn.LeakyReLU(inplace=True),
                                                 nn.Conv2d(10 * M // 3, 8 * M // 3, 1), nn.LeakyReLU(inplace=True),
                                                 nn.Conv2d(8 * M // 3, 2 * M, 1)))  # fmt: skip
    else:  # Elic2022Official's context layers
        groups = [16, 16, 32, 64, M - 128]
        channel_context = {f"y{k}": nn.Sequential(conv(sum(groups[:k]), 224, kernel_size=5, stride=1), nn.ReLU(inplace=True),
                                                  conv(224, 128, kernel_size=5, stride=1), nn.ReLU(inplace=True),
                                                  conv(128, groups[k] * 2, kernel_size=5, stride=1))
                           for k in range(1, len(groups))}  # fmt: skip
        y = ChannelGroupsLatentCodec(groups=groups, channel_context=channel_context, latent_codec={
            f"y{k}": checkerboard(g, 2 * g + (k > 0) * 2 * g + 2 * M) for k, g in enumerate(groups)})  # fmt: skip

    class LatentModel(CompressionModel):  # update() and aux_loss() over its entropy models
        def __init__(self):
            super().__init__()
            self.latent_codec = HyperpriorLatentCodec(latent_codec={"y": y, "hyper": hyper})

        def forward(self, y):
            return self.latent_codec(y)

    return train.entropy_models_in_fp32(LatentModel())


def load_latents(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.load(cache, weights_only=True)["latents"],
            torch.load(cache.with_name(f"{cache.stem}_val{cache.suffix}"), weights_only=True)["latents"])  # fmt: skip


@torch.no_grad()
def validation_bpp(model: nn.Module, latents: torch.Tensor, batch: int, criterion) -> float:
    model.eval()
    total = sum(criterion(model(latents[i : i + batch]), latents[i : i + batch])["bpp"].item() * len(latents[i : i + batch])
                for i in range(0, len(latents), batch))  # fmt: skip
    model.train()
    return total / len(latents)


def train_compressai_prior(args, kind: str, codec: bk.DiffusionHyperprior, run: Path, cache: Path) -> dict:
    """The train script's latent mode, for a CompressAI latent codec: the same sampler, schedule,
    budget clock, validation cadence and patience. Keeps the best weights in ``run/best.pth``."""
    done = run / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    lic_common.seed_everything(args.seed)
    model = compressai_prior(kind, codec).train()
    latents, val = load_latents(cache)
    criterion = train.RateLoss(codec.latent_factor**2)
    main_params, aux_params = train.split_parameters(model)
    opt, aux_opt = torch.optim.Adam(main_params, lr=args.lr), torch.optim.Adam(aux_params, lr=1e-3)
    schedule = train.LRSchedule(opt, "cosine", 50, 0.05)
    sampler = train.SeededSampler(len(latents), args.epoch_size, args.seed, batch_size=args.batch_size)
    budget, elapsed, step, epoch, best, stale, curve = args.minutes * 60, 0.0, 0, 0, math.inf, 0, []
    while elapsed < budget and stale < args.patience:
        sampler.set_epoch(epoch)
        order = [i for i, _, _ in sampler]
        for start in range(0, len(order), args.batch_size):
            tick = time.process_time()
            y = latents[order[start : start + args.batch_size]]
            loss = criterion(model(y), y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(main_params, 1.0)
            opt.step()
            aux = model.aux_loss()
            aux_opt.zero_grad(set_to_none=True)
            aux.backward()
            aux_opt.step()
            elapsed += time.process_time() - tick
            step += 1
            schedule.step(step, elapsed / budget)
            if elapsed >= budget:
                break
        epoch += 1
        bpp = validation_bpp(model, val, args.batch_size, criterion)
        curve.append([step, bpp])
        best, stale = (bpp, 0) if bpp < best else (best, stale + 1)
        if stale == 0:
            lic_common.save_checkpoint({"state_dict": model.state_dict()}, run / "best.pth")
        print(f"{run.name}: step {step} validation bpp {bpp:.4f}{' (best)' if stale == 0 else ''}", flush=True)
    summary = {"step": step, "epoch": epoch, "best_loss": best, "elapsed_seconds": elapsed, "stale_validations": stale, "curve": curve}
    lic_common.write_text_atomic(done, json.dumps(summary))
    return summary


def train_all(args: argparse.Namespace, work: Path) -> dict:
    """Every (rate point, prior) run; -> {point: {prior: summary}}."""
    runs = {}
    middle = args.checkpoints[len(args.checkpoints) // 2]
    for checkpoint in args.checkpoints:
        point = point_name(checkpoint)
        cache = work / point / "latents.pth"
        priors = [*args.priors, *(v for v in args.variants if checkpoint == middle and v not in args.priors)]
        codec = bk.load_codec(checkpoint, device="cpu")[0]  # the start of h_a, h_s and the bottleneck
        for name in sorted(priors, key=lambda n: n not in CODEC_PRIORS):  # a codec run caches the latents first
            run = work / point / name
            if name in CODEC_PRIORS:
                summary = train_codec_prior(args, checkpoint, name, run, cache)
            else:
                summary = train_compressai_prior(args, name, codec, run, cache)
            runs.setdefault(point, {})[name] = summary
            print(f"{point} {name}: {summary['step']} steps, best validation bpp {summary['best_loss']:.4f}", flush=True)
    return runs


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir)
    torch.set_num_threads(torch.get_num_threads())
    runs = train_all(args, work)
    return {"runs": runs}


if __name__ == "__main__":
    main(sys.argv[1:])

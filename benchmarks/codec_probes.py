"""Probes of a trained codec and of training variants: the measurements behind the README's
"Tried in a later sitting" (Results), each a subcommand that prints its figures.

- ``latents CKPT``: the trained synthesis transform on several latents of the same images: the
  chain's (rounded around its means), the same moved to each bin's Gaussian centroid, rounded
  around mu0 (0 steps), the chain with subtractive dither (universal quantization, Agustsson &
  Theis 2020: encoder and decoder share u, the decoder sees exactly y + u), the training proxy
  y + u, and y itself. Rate from the likelihoods (the ideal code length; the file adds < 0.5%).
- ``finetune-decoder CKPT OUT``: trains only g_s, on the latents the chain really decodes, every
  other weight frozen (the rate cannot move); OUT is a slim checkpoint to evaluate.
- ``train VARIANT -- TRAIN_ARGS``: ``train_bk_sdm_compression.py`` with a prototype change:
  ``detach`` (the U-Net's revealed context carries no gradient into g_a), ``unet-lr:F`` (the
  U-Net in its own Adam group at F x ``--lr``), ``scale-prior`` (``bmshj2018-hyperprior``'s h_a on
  |y| and scales-only h_s inside the codec, mu0 = 0). Checkpoints of ``scale-prior`` are read back
  only through ``evaluate VARIANT -- EVAL_ARGS``, which applies the same change first.
- ``crop-sizes CKPT [CKPT ...]``: how a trained model's rate and PSNR carry over from the training
  crop size to larger images (and, with ``--split training``, from the images trained on to the
  held-out ones): bpp (from the likelihoods) and PSNR on tiles of the photographs at each ``--sizes``, in train mode (the noisy proxy) and eval mode (rounding; the
  codec's chain), and the PSNR of the transforms alone (g_s(g_a(x)), nothing quantized). Any
  checkpoint ``evaluate_bk_sdm_compression.py`` reads.
- ``step-times``: seconds of a training step of the codec (4 steps, all and sampled teacher
  forcing; 2 steps; 0 steps) and ``bmshj2018-hyperprior``, interleaved, fp32 and bfloat16
  (``--precisions``); with ``--compile``, also torch.compile'd copies.
- ``unet-times``: the codec's U-Net alone, forward and backward on random inputs of its shape, at
  several batch sizes (1; one pass per image; the teacher-forced passes of a training batch),
  fastest of ``--timing_steps``, and the share of its time spent in convolutions (a profile):
  what is per-call overhead and what is arithmetic.

    python benchmarks/codec_probes.py latents reference_checkpoints/diffusion-hyperprior-lambda0.0012.pth
    python benchmarks/codec_probes.py finetune-decoder reference_checkpoints/diffusion-hyperprior-lambda0.0012.pth OUT.pth
    python benchmarks/codec_probes.py train detach -- --data_path ../shared/data/train --output_dir RUN ...
    python benchmarks/codec_probes.py crop-sizes RUN_A/best_checkpoint.pth RUN_B/best_checkpoint.pth
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import evaluate_bk_sdm_compression as ev  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402

LATENTS = ("chain", "chain_centroid", "mu0", "dither", "proxy", "exact")

# ---- Latents ----


def _bin_centroid(y_hat: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E[y | y in [y_hat - 1/2, y_hat + 1/2]] under N(means, scales)."""
    d = torch.distributions.Normal(means, scales)
    lo, hi = y_hat - 0.5, y_hat + 0.5
    mass = d.cdf(hi) - d.cdf(lo)
    centroid = means + scales**2 * (d.log_prob(lo).exp() - d.log_prob(hi).exp()) / mass.clamp_min(1e-9)
    return torch.where(mass > 1e-6, centroid, y_hat).clamp(lo, hi)


@torch.no_grad()
def latents(model: bk.DiffusionHyperprior, x: torch.Tensor, u: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """name -> (bits of y and z from the likelihoods, PSNR, latent mean square error against y)."""
    H, W = x.shape[-2:]
    y = model.g_a(model._pad(x)).float()
    z_hat, z_likelihoods = model.entropy_bottleneck(model.h_a(y))
    mu0, s0 = model.hyper_decode(z_hat)
    z_bits = -z_likelihoods.log2().sum().item()
    steps = model.config.diffusion_steps

    def chain(quantize, inference_steps=steps):
        model.set_inference_steps(inference_steps)
        y_hat, means, scales, state = model._run_chain(mu0, s0, quantize)
        model.set_inference_steps(steps)
        return y_hat, -model._y_likelihoods(state, scales, means).log2().sum().item() + z_bits, means, scales

    def rounded(k, sel, m, s):
        return torch.round(y[:, sel] - m) + m

    def dithered(k, sel, m, s):
        return torch.round(y[:, sel] - m - u[:, sel]) + m + u[:, sel]

    y_chain, bits, means, scales = chain(rounded)
    y_mu0, bits_mu0, _, _ = chain(rounded, 0)
    y_dither, bits_dither, _, _ = chain(dithered)
    candidates = {"chain": (y_chain, bits), "chain_centroid": (_bin_centroid(y_chain, means, scales), bits),
                  "mu0": (y_mu0, bits_mu0), "dither": (y_dither, bits_dither), "proxy": (y + u, math.nan), "exact": (y, math.nan)}  # fmt: skip
    out = {}
    for name, (latent, b) in candidates.items():
        x_hat = model.g_s(latent)[..., :H, :W].clamp(0, 1)
        out[name] = (b, lic_common.psnr(x, x_hat), (latent - y).pow(2).mean().item())
    return out


def run_latents(args: argparse.Namespace) -> dict:
    model, _ = bk.load_codec(args.checkpoint)
    files = lic_common.list_images(args.images)[: args.max_images or None]
    generator = torch.Generator().manual_seed(args.seed)
    sums = {n: [0.0, 0.0, 0.0] for n in LATENTS}
    for path in files:
        x = lic_common.load_image(path)[None]
        u = torch.rand(model.g_a(model._pad(x)).shape, generator=generator) - 0.5
        for name, (bits, psnr, mse) in latents(model, x, u).items():
            for i, v in enumerate((bits / (x.shape[-2] * x.shape[-1]), psnr, mse)):
                sums[name][i] += v / len(files)
    for name, (bpp, psnr, mse) in sums.items():
        print(f"{name:15s} bpp {bpp:.4f}  PSNR {psnr:.2f} dB  latent MSE {mse:.4f}")
    return {n: dict(zip(("bpp", "psnr", "latent_mse"), v)) for n, v in sums.items()}


# ---- Decoder fine-tuning ----


def run_finetune_decoder(args: argparse.Namespace) -> dict:
    model, ckpt = bk.load_codec(args.checkpoint)
    files, _ = tr.split_files(lic_common.list_images(args.data_path), 0.1)  # the training script's default split
    crops = tr.ImageFolderCrops(files, args.crop, True, cache_mb=2048, downscale=(args.downscale_min, 1.0))
    model.requires_grad_(False)
    model.g_s.requires_grad_(True)
    optimizer = torch.optim.Adam(model.g_s.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        x = torch.stack([crops[(int(torch.randint(len(crops), (), generator=generator)),
                                int(torch.randint(2**31, (), generator=generator)), args.crop)] for _ in range(args.batch_size)])  # fmt: skip
        with torch.no_grad():
            y = model.g_a(x).float()
            mu0, s0 = model.hyper_decode(model.entropy_bottleneck(model.h_a(y))[0])
            y_hat = model._run_chain(mu0, s0, lambda k, sel, m, s: torch.round(y[:, sel] - m) + m)[0]
        for group in optimizer.param_groups:  # cosine to 5%, no warm-up
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        loss = F.mse_loss(model.g_s(y_hat), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: training PSNR {-10 * math.log10(loss.item()):.2f} dB", flush=True)
    lic_common.save_checkpoint(bk.slim_checkpoint({**ckpt, "state_dict": model.state_dict()}, half=False), args.output)
    print(f"saved {args.output}: evaluate it with evaluate_bk_sdm_compression.py --model_path {args.output}")
    return {"output": args.output, "steps": args.steps}


# ---- Crop sizes ----


def centre_tiles(x: torch.Tensor, size: int, grid: int) -> list[torch.Tensor]:
    """The tiles of a ``grid`` x ``grid`` block of ``size`` px tiles centred on the image that fit
    in it; where none does, the centre tile; none where the image is smaller than ``size``."""
    H, W = x.shape[-2:]
    if min(H, W) < size:
        return []
    offsets = [(k - (grid - 1) / 2) for k in range(grid)]
    corners = [(round(H / 2 - size / 2 + dy * size), round(W / 2 - size / 2 + dx * size)) for dy in offsets for dx in offsets]
    corners = [(t, l) for t, l in corners if 0 <= t and t + size <= H and 0 <= l and l + size <= W] or [((H - size) // 2, (W - size) // 2)]
    return [x[..., t : t + size, l : l + size] for t, l in corners]


@torch.no_grad()
def transforms_psnr(model: nn.Module, x: torch.Tensor) -> float:
    """PSNR of g_s(g_a(x)), the latent not quantized: what the learned transforms reconstruct
    apart from the entropy model and the quantizer (any model with ``g_a`` and ``g_s``; the codec pads)."""
    pad = getattr(model, "_pad", lambda v: v)
    x_hat = model.g_s(model.g_a(pad(x))).float()[..., : x.shape[-2], : x.shape[-1]]
    return lic_common.psnr(x, x_hat.clamp(0, 1))


@torch.no_grad()
def run_crop_sizes(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    training, held_out = tr.split_files(lic_common.list_images(args.data_path), 0.1)  # the training script's default split
    images = [lic_common.load_image(f) for f in (held_out if args.split == "held-out" else training)[: args.max_images or None]]
    batches = {}  # size -> the tiles of every image, cut once for all checkpoints
    for size in args.sizes:
        tiles = [t for im in images for t in centre_tiles(im, size, args.grid)]
        if not tiles:
            raise ValueError(f"no {args.split} image of {args.data_path} is {size} px or larger")
        batches[size] = torch.stack(tiles)
    load_args = argparse.Namespace(bk_sdm_path=None, diffusion_steps=None, use_pretrained_vae=None, use_pretrained_unet=None)
    results = {}
    for path in args.checkpoints:
        model = ev.load_learned(path, load_args)
        row = results.setdefault(path, {})
        for size, x in batches.items():
            for mode in ("train", "eval"):
                model.train(mode == "train")
                torch.manual_seed(args.seed)  # the proxy's noise
                out = model(x)
                bits = sum(-l.double().log2().sum().item() for l in out["likelihoods"].values())
                bpp, psnr = bits / x[:, 0].numel(), lic_common.psnr(x, out["x_hat"].clamp(0, 1))
                row[f"{size}px {mode}"] = {"bpp": bpp, "psnr": psnr, "loss": 10 ** (-psnr / 10) + args.lambda_rate * bpp, "tiles": len(x)}
            row[f"{size}px transforms"] = {"psnr": transforms_psnr(model, x), "tiles": len(x)}
        print(path, " | ".join(f"{k}: {v['psnr']:.2f} dB" if "bpp" not in v else f"{k}: {v['bpp']:.3f} bpp {v['psnr']:.2f} dB D+lR {v['loss']:.5f}"
                               for k, v in row.items()), flush=True)  # fmt: skip
    return results


# ---- Training variants ----


class _Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


def apply_variant(variant: str, lr: float | None = None) -> None:
    """Patch the codec or the trainer in this process (prototypes; nothing is kept)."""
    if variant == "detach":
        forced = bk.DiffusionHyperprior._teacher_forced
        bk.DiffusionHyperprior._teacher_forced = lambda self, y_noisy, mu0, s0: forced(self, y_noisy.detach(), mu0, s0)
    elif variant.startswith("unet-lr:"):
        factor, split = float(variant.split(":")[1]), tr.split_parameters

        def split_with_unet_group(model):
            main, aux = split(model)
            if not isinstance(model, bk.DiffusionHyperprior):
                return main, aux
            unet = {id(p) for p in model.unet.parameters()}
            return [{"params": [p for p in main if id(p) not in unet]},
                    {"params": [p for p in main if id(p) in unet], "lr": lr * factor}], aux  # fmt: skip

        tr.split_parameters = split_with_unet_group
    elif variant == "scale-prior":
        from compressai.models.utils import conv, deconv

        bk.hyper_analysis = lambda N, M: nn.Sequential(_Abs(), conv(M, N, stride=1, kernel_size=3), nn.ReLU(inplace=True),
                                                       conv(N, N), nn.ReLU(inplace=True), conv(N, N))  # fmt: skip
        bk.hyper_synthesis = lambda N, M: nn.Sequential(deconv(N, N), nn.ReLU(inplace=True), deconv(N, N), nn.ReLU(inplace=True),
                                                        conv(N, M, stride=1, kernel_size=3), nn.ReLU(inplace=True))  # fmt: skip

        def scales_only(self, z_hat):
            sigma0 = self.h_s(z_hat).float()
            return torch.zeros_like(sigma0), self.gaussian_conditional.lower_bound_scale(sigma0)

        bk.DiffusionHyperprior.hyper_decode = scales_only
    else:
        raise ValueError(f"unknown variant {variant!r}: detach, unet-lr:F or scale-prior")


# ---- Step times ----


def run_step_times(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    results = {}
    for amp in (p == "bfloat16" for p in args.precisions):
        torch.manual_seed(0)
        models = {}
        for name, steps, forcing in (("codec, 4 steps", 4, "all"), ("codec, 4 steps, sampled", 4, "sampled"), ("codec, 2 steps", 2, "all"), ("codec, 0 steps", 0, "all")):
            models[name] = bk.create_diffusion_hyperprior_model(N=args.N, M=args.M, diffusion_steps=steps, unet_channels=args.unet_channels)
            models[name].teacher_forcing = forcing
        models["bmshj2018-hyperprior"] = tr.build_model({"architecture": "bmshj2018-hyperprior", "N": args.N, "M": args.M})
        if args.compile:  # compiled copies, as train_bk_sdm_compression.py --compile trains (the first step compiles)
            for name in ("codec, 4 steps", "codec, 0 steps", "bmshj2018-hyperprior"):
                models[f"{name}, compiled"] = torch.compile(copy.deepcopy(models[name]))
        times = tr.time_training_steps(models, tr.RateDistortionLoss(1.2e-3), x, args.timing_steps, lr=5e-4, amp=amp)
        label = "bfloat16" if amp else "fp32"
        results[label] = {name: min(t[1:]) for name, t in times.items()}  # the first step warms up
        for name, t in times.items():
            print(f"{label:8s} {name:24s} fastest {min(t[1:]):.3f} s, median {statistics.median(t[1:]):.3f} s")
    return results


def run_unet_times(args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = bk.create_diffusion_hyperprior_model(N=args.N, M=args.M, diffusion_steps=4, unet_channels=args.unet_channels).unet
    side = args.image_size // 16  # g_a's downsampling
    in_channels = unet.config.in_channels

    def step(batch: int) -> None:
        x = torch.randn(batch, in_channels, side, side, requires_grad=True)
        unet(x, torch.randint(0, bk.SCRATCH_TIMESTEPS, (batch,))).sample.square().mean().backward()

    seconds = {}
    for batch in args.batches:
        times = []
        for _ in range(args.timing_steps):
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
        seconds[batch] = min(times[1:])  # the first warms up
        print(f"U-Net forward + backward, batch {batch:3d} x {in_channels} x {side} x {side}: fastest {1000 * seconds[batch]:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(max(args.batches))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / total
    print(f"batch {max(args.batches)}: {100 * share:.0f}% of the time in convolutions")
    return {"seconds": seconds, "convolution_share": share}


# ---- Command line ----


def _add_model_size_args(q: argparse.ArgumentParser) -> None:
    """The sizes the timing subcommands build their models at (the RD benchmark's)."""
    q.add_argument("--N", type=int, default=64, help="channels")
    q.add_argument("--M", type=int, default=96, help="latent channels")
    q.add_argument("--unet_channels", type=int, default=32, help="U-Net width")
    q.add_argument("--image_size", type=int, default=128, help="crop size (the latent is 1/16 of it)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("latents", help="the trained decoder on several latents of the same images", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("checkpoint", help="a codec checkpoint")
    q.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="folder of images")
    q.add_argument("--max_images", type=int, default=0, help="the first this many images (0: all)")
    q.add_argument("--seed", type=int, default=0, help="seed of the dither and the proxy's noise")
    q = sub.add_parser("finetune-decoder", help="train g_s alone on the latents the chain decodes", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("checkpoint", help="a codec checkpoint")
    q.add_argument("output", help="the slim checkpoint to write")
    q.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "train"), help="training images")
    q.add_argument("--steps", type=int, default=600, help="training steps")
    q.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (cosine to 5%%)")
    q.add_argument("--crop", type=int, default=128, help="crop size")
    q.add_argument("--downscale_min", type=float, default=0.5, help="crops from the image downscaled by a random factor in [this, 1]")
    q.add_argument("--batch_size", type=int, default=8, help="crops per step")
    q.add_argument("--seed", type=int, default=0, help="seed of the crops")
    for name, what in (("train", "train_bk_sdm_compression.py"), ("evaluate", "evaluate_bk_sdm_compression.py")):
        q = sub.add_parser(name, help=f"{what} with a prototype change (arguments after --)")
        q.add_argument("variant", help="detach, unet-lr:F or scale-prior")
        q.add_argument("script_args", nargs=argparse.REMAINDER, help=f"{what}'s arguments, after --")
    q = sub.add_parser("crop-sizes", help="rate and PSNR of trained models on held-out tiles of several sizes", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("checkpoints", nargs="+", help="checkpoints evaluate_bk_sdm_compression.py reads")
    q.add_argument("--data_path", default=str(ROOT.parent / "shared" / "data" / "train"), help="the training images")
    q.add_argument("--split", default="held-out", choices=("held-out", "training"), help="their held-out share (the training script's default split), or the images trained on")
    q.add_argument("--max_images", type=int, default=0, help="the first this many images of the split (0: all)")
    q.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="tile sizes")
    q.add_argument("--lambda_rate", type=float, default=1.2e-3, help="lambda of the D + lambda R printed (D: the 8-bit MSE on [0, 1])")
    q.add_argument("--grid", type=int, default=3, help="tiles from a grid x grid block around each image's centre")
    q.add_argument("--seed", type=int, default=0, help="seed of the proxy's noise")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    q = sub.add_parser("step-times", help="training step times, fp32 and bfloat16", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_size_args(q)
    q.add_argument("--batch_size", type=int, default=8, help="batch size")
    q.add_argument("--timing_steps", type=int, default=15, help="timed steps per model (the first warms up)")
    q.add_argument("--precisions", nargs="+", default=["fp32", "bfloat16"], choices=("fp32", "bfloat16"), help="fp32, and/or bfloat16 autocast")
    q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="also time torch.compile'd copies of the codec (4 and 0 steps) and bmshj2018-hyperprior")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    q = sub.add_parser("unet-times", help="the codec's U-Net alone: forward + backward at several batch sizes", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_size_args(q)
    q.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (8 images x 4 teacher-forced passes = 32)")
    q.add_argument("--timing_steps", type=int, default=30, help="timed passes per batch size (the first warms up)")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.command in ("train", "evaluate"):
        script_args = [a for a in args.script_args if a != "--"]
        lr = float(script_args[script_args.index("--lr") + 1]) if "--lr" in script_args else tr.parse_args(["--data_path", "."]).lr
        apply_variant(args.variant, lr)
        return (tr if args.command == "train" else ev).main(script_args)
    return {"latents": run_latents, "finetune-decoder": run_finetune_decoder, "crop-sizes": run_crop_sizes,
            "step-times": run_step_times, "unet-times": run_unet_times}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])

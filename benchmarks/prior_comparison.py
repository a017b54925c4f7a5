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
    diffusion-8           8 steps, checkerboard reveal       } ``--variants``: at the middle rate
    diffusion-channels-4  4 steps, channel-slice reveal      }  point only
    checkerboard          compressai.latent_codecs.CheckerboardLatentCodec, Cheng2020AnchorCheckerboard's
                          context and parameter layers at the latent's M channels
    elic                  compressai.latent_codecs.ChannelGroupsLatentCodec in ELIC's configuration:
                          groups 16, 16, 32, 64, M - 128, a checkerboard in each, Elic2022Official's layers

Beside them, ``checkpoint`` is the rate point's checkpoint as it is: its own prior, trained
jointly with its transforms (what the frozen-transform training improves on).

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
SHIPPED = "checkpoint"  # the rate point's checkpoint itself: its prior, trained jointly with its transforms
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
    p.add_argument("--minutes", type=float, default=8.0, help="minutes each model may train, on --budget_clock")
    p.add_argument("--budget_clock", default="process", choices=("process", "wall"), help="what --minutes counts: this process's CPU time (all threads), or wall time (on a GPU)")
    p.add_argument("--epoch_size", type=int, default=1024, help="latents between validations")
    p.add_argument("--patience", type=int, default=4, help="stop after this many validations without improvement")
    p.add_argument("--max_images", type=int, default=0, help="measure on the first this many images of each set (0: all)")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True, help="also measure on scikit-image's photographs")
    p.add_argument("--anchor", default="mean-scale", choices=PRIORS, help="BD-rate anchor of the summary table")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of every run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the entropy models train (they code on the CPU)")
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
            "--budget_clock", args.budget_clock, "--patience", str(args.patience), "--warmup_steps", "50", "--no-amp", "--no-progress",
            "--num_workers", "0", "--save_every", "0", "--seed", str(args.seed), "--device", args.device]  # fmt: skip


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


def elic_groups(M: int) -> list[int]:
    """ELIC's uneven channel groups: 16, 16, 32, 64, M - 128 (smaller latents, as in the tests:
    the same shares of M, each at least one channel)."""
    if M > 128:
        return [16, 16, 32, 64, M - 128]
    head = [max(1, M // 16), max(1, M // 16), max(1, M // 8), max(1, M // 4)]
    return [*head, M - sum(head)]


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
        groups = elic_groups(M)
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
    device = torch.device(args.device)
    model = compressai_prior(kind, codec).to(device).train()
    latents, val = (t.to(device) for t in load_latents(cache))
    criterion = train.RateLoss(codec.latent_factor**2)
    main_params, aux_params = train.split_parameters(model)
    opt, aux_opt = torch.optim.Adam(main_params, lr=args.lr), torch.optim.Adam(aux_params, lr=1e-3)
    schedule = train.LRSchedule(opt, "cosine", 50, 0.05)
    sampler = train.SeededSampler(len(latents), args.epoch_size, args.seed, batch_size=args.batch_size)
    clock = time.process_time if args.budget_clock == "process" else time.perf_counter
    budget, elapsed, step, epoch, best, stale, curve = args.minutes * 60, 0.0, 0, 0, math.inf, 0, []
    while elapsed < budget and stale < args.patience:
        sampler.set_epoch(epoch)
        order = [i for i, _, _ in sampler]
        for start in range(0, len(order), args.batch_size):
            tick = clock()
            y = latents[torch.tensor(order[start : start + args.batch_size], device=device)]
            loss = criterion(model(y), y)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(main_params, 1.0)
            opt.step()
            aux = model.aux_loss()
            aux_opt.zero_grad(set_to_none=True)
            aux.backward()
            aux_opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += clock() - tick
            step += 1
            schedule.step(step, elapsed / budget)
            if elapsed >= budget:
                break
        epoch += 1
        bpp = validation_bpp(model, val, args.batch_size, criterion)
        curve.append([step, bpp])
        best, stale = (bpp, 0) if bpp < best else (best, stale + 1)
        if stale == 0:
            lic_common.save_checkpoint({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, run / "best.pth")
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


# ---- Measuring ----


class Coder:
    """One trained entropy model at one rate point: ``code(x)`` encodes an image, ``payload`` counts
    its bytes, ``decodes_to`` decodes them and compares with the encoder's latent."""

    def __init__(self, name: str, run: Path, codec: bk.DiffusionHyperprior, checkpoint: str):
        self.name, self.codec = name, codec
        if name == SHIPPED:
            self.model = bk.load_codec(checkpoint, device="cpu")[0]
        elif name in CODEC_PRIORS:
            self.model = bk.load_codec(run / "best_checkpoint.pth", device="cpu")[0]
        else:
            self.model = compressai_prior(name, codec)
            self.model.load_state_dict(lic_common.load_checkpoint(run / "best.pth")["state_dict"])
            self.model.update(force=True)
        self.model.eval()

    @property
    def is_codec(self) -> bool:
        return self.name == SHIPPED or self.name in CODEC_PRIORS

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> tuple[dict, torch.Tensor, float]:
        """-> (the encoder's output, its decoded latent, the likelihood estimate's bits); the
        analysis transform runs once for CompressAI's models (the codec's ``compress`` runs its own)."""
        y = self.codec.g_a(self.codec._pad(x[None]))
        out = self.model.compress(x[None]) if self.is_codec else self.model.latent_codec.compress(y)
        likelihoods = (self.model(y, latent=True) if self.is_codec else self.model(y))["likelihoods"]
        bits = sum(-v.double().log2().sum().item() for v in likelihoods.values())
        return out, out["y_hat"], bits

    @staticmethod
    def payload(out: dict) -> int:
        return sum(len(s) for group in out["strings"] for s in group)

    @torch.no_grad()
    def decodes_to(self, out: dict, y_hat: torch.Tensor) -> bool:
        """The latent decoded from ``out``'s bytes is the encoder's ``y_hat``."""
        if self.is_codec:
            decoded = self.model.decompress(out["strings"], out["shape"], digests=out["digests"])["y_hat"]
        else:
            decoded = self.model.latent_codec.decompress(out["strings"], out["shape"])["y_hat"]
        return torch.equal(decoded, y_hat)


def measure_point(args, work: Path, point: str, checkpoint: str, names: list[str], sets: dict[str, list[Path]]) -> dict:
    """{set: {prior: [per-image result dicts]}} at one rate point, cached in ``work/point/measured.json``."""
    path = work / point / "measured.json"
    measured = json.loads(path.read_text()) if path.is_file() else {}
    codec = bk.load_codec(checkpoint, device="cpu")[0]
    for name in names:
        if all(name in measured.get(where, {}) for where in sets):
            continue
        coder = Coder(name, work / point / name, codec, checkpoint)
        for where, files in sets.items():
            rows = []
            for i, f in enumerate(files):
                x = lic_common.load_image(f)
                pixels = x.shape[-2] * x.shape[-1]
                start = time.perf_counter()
                out, y_hat, bits = coder.code(x)
                seconds = time.perf_counter() - start
                payload = coder.payload(out)
                psnr, ms_ssim = ev.image_metrics(x, codec.synthesize(y_hat, *x.shape[-2:])[0])
                rows.append({"image": f.name, "bpp": 8 * payload / pixels, "bpp_estimate": bits / pixels, "psnr": psnr,
                             "ms_ssim": ms_ssim, "seconds": seconds, "roundtrip": coder.decodes_to(out, y_hat) if i == 0 else None})  # fmt: skip
            measured.setdefault(where, {})[name] = rows
            print(f"{point} {name} {where}: {sum(r['bpp'] for r in rows) / len(rows):.4f} bpp "
                  f"{sum(r['psnr'] for r in rows) / len(rows):.2f} dB", flush=True)  # fmt: skip
        lic_common.write_text_atomic(path, json.dumps(measured))
    return measured


def curves_of(measured: dict[str, dict], where: str) -> dict[str, dict]:
    """{prior: curve} over the rate points, as ``rd_kodak.json`` lays curves out."""
    results = [ev.ImageResult(curve=name, point=point, image=r["image"], bpp=r["bpp"], bpp_estimate=r["bpp_estimate"],
                              psnr=r["psnr"], ms_ssim=r["ms_ssim"], compression_ratio=math.nan, encode_seconds=r["seconds"],
                              decode_seconds=math.nan, peak_memory_mb=math.nan, roundtrip_matches_forward=r["roundtrip"])
               for point, m in measured.items() for name, rows in m[where].items() for r in rows]  # fmt: skip
    curves = ev.curves_from_results(results)
    for c in curves.values():
        c["description"] = f"entropy model trained on frozen latents (benchmarks/prior_comparison.py); {c['description']}"
    return curves


def summarize(args, runs: dict, measured: dict, sets: dict) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "work_dir", "device")}  # no machine's paths
    summary = {"settings": settings | {"checkpoints": [Path(c).name for c in args.checkpoints]}, "runs": runs}
    for where in sets:
        curves = curves_of(measured, where)
        main_curves = {k: v for k, v in curves.items() if len(v["results"]["bpp"]) > 1}
        per_point = {point: {name: {k: sum(r[k] for r in rows) / len(rows) for k in ("bpp", "bpp_estimate", "psnr")}
                             | {"roundtrip": rows[0]["roundtrip"]} for name, rows in m[where].items()}
                     for point, m in measured.items()}  # fmt: skip
        for point in per_point.values():
            for row in point.values():
                if args.anchor in point:
                    row[f"bits_vs_{args.anchor}_percent"] = 100 * (row["bpp"] / point[args.anchor]["bpp"] - 1)
        summary[where] = {"images": [f.name for f in sets[where]], "curves": curves,
                          "bd_rate": {a: ev.bd_rates(main_curves, a) for a in ("mean-scale", "checkerboard", "elic") if a in main_curves},
                          "per_point": per_point}  # fmt: skip
    return summary


def write_results(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lic_common.write_text_atomic(path.with_suffix(".json"), json.dumps(summary, indent=1))
    lines = [f"# Entropy models on the same frozen latents ({', '.join(summary['settings']['checkpoints'] and [Path(c).stem for c in summary['settings']['checkpoints']])})", ""]
    for where in ("kodak", "unseen"):
        if where not in summary:
            continue
        s = summary[where]
        lines += [f"## {where} ({len(s['images'])} images)", ""]
        anchors = list(s["bd_rate"])
        if anchors:
            lines += ["BD-rate (PSNR) of each curve (rows) against each anchor (columns), %:", "",
                      "| curve | " + " | ".join(anchors) + " |", "|---" * (len(anchors) + 1) + "|"]  # fmt: skip
            for name in s["bd_rate"][anchors[0]]:
                lines.append(f"| {name} | " + " | ".join(f"{s['bd_rate'][a][name]['bd_rate_psnr']:+.2f}" for a in anchors) + " |")
        lines += ["", "Each rate point: bpp (real bytes), estimate, PSNR, bits against the anchor, round trip of the first image:", "",
                  "| point | prior | bpp | estimate | PSNR (dB) | bits vs anchor | round trip |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for point, rows in s["per_point"].items():
            for name, r in rows.items():
                vs = r.get(f"bits_vs_{summary['settings']['anchor']}_percent", math.nan)
                lines.append(f"| {point} | {name} | {r['bpp']:.4f} | {r['bpp_estimate']:.4f} | {r['psnr']:.2f} | {vs:+.2f}% | {r['roundtrip']} |")
        lines.append("")
    lines += ["## Training (validation bpp on held-out latents)", "", "| point | prior | steps | best validation bpp | stopped by |", "|---|---|---|---|---|"]
    for point, runs in summary["runs"].items():
        for name, r in runs.items():
            stop = "patience" if r["stale_validations"] >= summary["settings"]["patience"] else "budget"
            lines.append(f"| {point} | {name} | {r['step']} | {r['best_loss']:.4f} | {stop} |")
    lic_common.write_text_atomic(path.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(summary, path.with_suffix(".png"))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(summary["runs"])
    color = {name: f"C{i}" for i, name in enumerate([*PRIORS, SHIPPED])}
    fig, axes = plt.subplots(1, 1 + len(points), figsize=(5 * (1 + len(points)), 4.2))
    for name, c in summary["kodak"]["curves"].items():
        r = c["results"]
        axes[0].plot(r["bpp"], r["psnr-rgb"], "o-" if len(r["bpp"]) > 1 else "s", color=color[name], label=name)
    axes[0].set(xlabel="bits per pixel (real bytes)", ylabel="PSNR-RGB (dB)", title="Kodak")
    for ax, point in zip(axes[1:], points):
        for name, r in summary["runs"][point].items():
            steps, bpp = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(steps, bpp, color=color[name], label=name)
        ax.set(xlabel="training step", ylabel="validation bpp", title=point)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir)
    runs = train_all(args, work)
    sets = {"kodak": lic_common.list_images(args.kodak)}
    if args.unseen:
        sets["unseen"] = lic_common.write_sample_photos(work / "unseen")
    sets = {k: v[: args.max_images or None] for k, v in sets.items()}
    measured = {point_name(c): measure_point(args, work, point_name(c), c, [*runs[point_name(c)], SHIPPED], sets) for c in args.checkpoints}
    summary = summarize(args, runs, measured, sets)
    write_results(summary, Path(args.results))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""Train the diffusion-hyperprior codec, or one of CompressAI's architectures, end to end.

Rate-distortion training as in Ballé et al. 2018 and CompressAI's ``examples/train.py``:

    loss = D + lambda_rate * bpp

with D the MSE of images in [0, 1] (or 1 - MS-SSIM) and bpp = -sum(log2 likelihoods) / pixels.
For the codec the rate of y is the masked diffusion's negative log-likelihood, so this one loss
trains the U-Net too. A larger ``--lambda_rate`` compresses harder. CompressAI writes the same trade-off as
``lmbda * 255^2 * MSE + bpp``, so ``lambda_rate = 1 / (255^2 * lmbda)``: its qualities 1..8
(lmbda 0.0018 ... 0.18) are lambda_rate 8.5e-3, 4.4e-3, 2.3e-3, 1.2e-3, 6.2e-4, 3.2e-4, 1.7e-4,
8.5e-5. The entropy bottleneck's ``quantiles`` have their own Adam (the auxiliary loss).

    python train_bk_sdm_compression.py --data_path ../shared/data/train --output_dir outputs/run1
    torchrun --nproc_per_node 4 train_bk_sdm_compression.py ...      # DistributedDataParallel

Batches are (B, 3, image_size, image_size) random crops in [0, 1] (``--crop_schedule`` grows the
size during training; ``--downscale_min`` takes them from randomly downscaled images). Everything the run writes is
inside ``--output_dir``: config.json, training.log, tensorboard/, samples/, last_checkpoint.pth,
best_checkpoint.pth (entropy tables updated, ready to compress) and checkpoint_<epoch>.pth.

On a trained mean-scale model (``--init_transforms mbt2018-mean:4``, or a checkpoint of this
project or of CompressAI's ``examples/train.py``) with ``--freeze g_a g_s``, only the entropy
model trains, and the distortion no longer depends on anything that trains. ``--cache_latents N``
then runs the frozen analysis transform once on N training crops (random downscales, positions
and flips), keeps the (N, M, h, w) latents (in ``--latent_cache``, reused by later runs on the same
transform and crops), and trains h_a, h_s and the prior on them at latent resolution with loss =
bpp: 16 x 16 latents instead of 256 x 256 images. ``--patience`` stops a run whose validation loss
has stopped improving.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import lic_common

bk = lic_common.lazy_import("bk_sdm_compression")  # the codec (and CompressAI) load at first use: --help answers before

# ---- Model choices ----

COMPRESSAI_ARCHITECTURES = (
    "bmshj2018-factorized",
    "bmshj2018-hyperprior",
    "mbt2018-mean",
    "mbt2018",
    "cheng2020-anchor",
)
MODEL_CHOICES = (lic_common.ARCHITECTURE, *COMPRESSAI_ARCHITECTURES)


def build_model(config: dict) -> nn.Module:
    """A model from the ``model`` section of a run's config (see ``model_config``)."""
    if config["architecture"] == bk.ARCHITECTURE:
        return bk.from_config(bk.CodecConfig.from_dict(config["codec"]))
    from compressai.zoo.image import model_architectures

    return entropy_models_in_fp32(model_architectures[config["architecture"]](config["N"], config["M"]))


def set_training_options(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The codec's training-only switches from the command line: they change how it trains, not
    what it decodes, so they are not part of its config (``--decoder_ste_from`` is set per step)."""
    if isinstance(model, bk.DiffusionHyperprior):
        model.teacher_forcing = args.teacher_forcing
    return model


def entropy_models_in_fp32(model: nn.Module) -> nn.Module:
    """Run every CompressAI entropy model of ``model`` outside autocast, on fp32 inputs, as the
    codec runs its own: under bfloat16 the likelihoods (and so the rate term) would lose bits of
    precision. Changes nothing without autocast. (Each entropy model's class becomes a subclass
    whose ``forward`` does this, so copies and state dicts are unaffected.)"""
    from compressai.entropy_models import EntropyModel

    for module in model.modules():
        if isinstance(module, EntropyModel) and not isinstance(module, _FP32Forward):
            module.__class__ = _fp32_class(type(module))
    return model


class _FP32Forward:
    def forward(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return super().forward(*args, **kwargs)


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_CLASSES:
        _FP32_CLASSES[cls] = type(f"FP32{cls.__name__}", (_FP32Forward, cls), {})
    return _FP32_CLASSES[cls]


def quality_lambdas(args: argparse.Namespace) -> list[float] | None:
    """--rate_levels rate weights, log-spaced from --lambda_max (quality 1) to --lambda_min."""
    n = args.rate_levels
    if not n:
        return None
    return [float(f"{math.exp(math.log(args.lambda_max) + (math.log(args.lambda_min) - math.log(args.lambda_max)) * i / (n - 1)):.4g}")
            for i in range(n)]  # fmt: skip


def initial_log_steps(lambdas: list[float], lambda_rate: float, M: int) -> torch.Tensor:
    """Quantization steps a model trained at ``lambda_rate`` starts from at each level: at high
    rate the distortion-rate slope gives step^2 proportional to the rate weight."""
    return (0.5 * torch.tensor(lambdas, dtype=torch.float64).div(lambda_rate).log()).float()[:, None].expand(-1, M).clone()


TRANSFORM_PARTS = ("g_a", "g_s", "h_a", "h_s", "entropy_bottleneck")  # the layers the codec shares with mbt2018-mean


def transforms_source(spec: str) -> dict[str, torch.Tensor]:
    """The state dict of a trained mean-scale model: ``ARCH:QUALITY`` from CompressAI's zoo
    (``pretrained=True``: a download, cached by torch.hub), or a checkpoint file of this project
    or of CompressAI's ``examples/train.py``."""
    if Path(spec).is_file():
        ckpt = lic_common.load_checkpoint(Path(spec))
        state = ckpt.get("state_dict", ckpt)
        return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    from compressai.zoo import image_models

    arch, _, quality = spec.partition(":")
    if arch not in image_models or not quality.isdigit():
        raise ValueError(f"--init_transforms {spec!r}: expected a checkpoint file or ARCH:QUALITY of CompressAI's zoo "
                         f"(e.g. mbt2018-mean:4; architectures {sorted(image_models)})")  # fmt: skip
    try:
        return image_models[arch](quality=int(quality), pretrained=True).state_dict()
    except Exception as e:  # no network, no such pretrained model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"--init_transforms {spec}: CompressAI's pretrained weights could not be loaded ({first}); "
                         "give a checkpoint file instead") from None


def copy_transforms(model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> list[str]:
    """Copy the source's g_a, g_s, h_a, h_s and entropy bottleneck into the codec (same names in
    CompressAI's mean-scale models); the coder tables are derived later. -> the names copied."""
    own = model.state_dict()
    wanted = {k: v for k, v in state.items() if k.split(".")[0] in TRANSFORM_PARTS and not k.endswith(bk.ENTROPY_TABLES)}
    mismatched = [k for k, v in wanted.items() if k in own and own[k].shape != v.shape]
    copied = {k: v for k, v in wanted.items() if k in own and k not in mismatched}
    if mismatched or not copied:
        raise ValueError(f"--init_transforms {spec}: {len(copied)} tensors match the codec, {len(mismatched)} differ in shape "
                         f"(e.g. {mismatched[:2]}): build the codec with the source's --N and --M")  # fmt: skip
    with torch.no_grad():  # in place (CompressAI's load_state_dict wants the coder tables too)
        for k, v in copied.items():
            own[k].copy_(v)
    return sorted(copied)


def model_config(args: argparse.Namespace) -> dict:
    """What rebuilds the model: the architecture and its constructor arguments."""
    if args.model == bk.ARCHITECTURE:
        codec = bk.CodecConfig(
            N=args.N,
            M=args.M,
            diffusion_steps=args.diffusion_steps,
            reveal=args.reveal,
            latent_denoise=args.latent_denoise,
            mode=args.mode,
            use_pretrained_vae=args.use_pretrained_vae,
            use_pretrained_unet=args.use_pretrained_unet,
            bk_sdm_path=args.bk_sdm_path if (args.use_pretrained_vae or args.use_pretrained_unet) else None,
            finetune_pretrained=args.finetune_pretrained,
            unet_channels=args.unet_channels,
            unet_levels=args.unet_levels,
            diffusion_strength=args.diffusion_strength,
            quality_lambdas=quality_lambdas(args),
        )
        return {"architecture": bk.ARCHITECTURE, "codec": codec.to_dict()}
    if args.quality is not None:
        from compressai.zoo.image import cfgs

        N, M = cfgs[args.model][args.quality]
    else:
        N, M = args.N, args.M
    return {"architecture": args.model, "N": N, "M": M}


def checkpoint_model_state(model: nn.Module, config: dict) -> dict:
    """The model part of a checkpoint: ``state_dict`` (so CompressAI's ``eval_model`` and
    ``load_codec`` read it), ``architecture`` and, for the codec, its ``config``."""
    if config["architecture"] == bk.ARCHITECTURE:
        return model.checkpoint_payload()
    return {"architecture": config["architecture"], "state_dict": model.state_dict(), "model_args": config}


# ---- Data ----


class ImageFolderCrops(Dataset):
    """Random crops of every image below a folder (searched recursively).

    Items are (index, seed, crop) triples from ``SeededSampler``, so crops depend on the seed
    alone: the same in every worker, on every rank, and after ``--resume``. Training crops come
    from a random position of the image downscaled by a random factor in ``downscale``
    (a (low, high) range; (1, 1): none), with a random horizontal flip; validation crops are the
    centre crop at full size. A file that cannot be decoded is skipped with a warning (the next
    file stands in). An image smaller than the crop is first upscaled so that its shorter side
    equals the crop size.
    """

    def __init__(self, files: list[Path], crop: int, train: bool, cache_mb: float = 0,
                 downscale: tuple[float, float] = (1.0, 1.0)):  # fmt: skip
        self.files, self.crop, self.train, self.downscale = files, crop, train, downscale
        self.bad: set[Path] = set()
        # decoded images kept in memory (8-bit, per worker) up to cache_mb: a small crop of a
        # large PNG otherwise costs a full decode every time
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_bytes, self.cache_limit = 0, cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            path = self.files[i]
            if i in self.cache:
                return self.cache[i].float().div_(255)
            if path in self.bad:
                continue
            try:
                x = lic_common.load_image(path)
                if self.cache_bytes + x.numel() <= self.cache_limit:
                    self.cache[i] = lic_common.to_uint8(x)
                    self.cache_bytes += x.numel()
                return x
            except lic_common.ImageError as e:
                self.bad.add(path)
                warnings.warn(f"skipping {e}", stacklevel=2)
        raise RuntimeError("no image in the data folder can be decoded")

    def __getitem__(self, item) -> torch.Tensor:
        index, seed, c = item if isinstance(item, tuple) else (item, 0, None)
        c = c or self.crop
        x = self._load(index)
        g = torch.Generator().manual_seed(seed)
        if self.train:
            x = lic_common.scaled_crop(x, c, lic_common.random_scale(g, *self.downscale), g)
        else:
            x = lic_common.scaled_crop(x, c, 1.0)
        if self.train and torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(-1)
        return x


class CropSchedule:
    """Crop size as a function of the training step: "64" (always 64 px) or "64,128@3000,256@9000"
    (64 px, then 128 px from step 3000, then 256 px from step 9000), as CompressAI-style training
    moves to larger crops once the transforms are roughly in place."""

    def __init__(self, spec: str):
        self.stages = []
        for i, part in enumerate(spec.split(",")):
            size, _, start = part.strip().partition("@")
            try:
                stage = (int(start) if start else 0, int(size))
            except ValueError:
                raise ValueError(f"bad crop schedule {spec!r}: expected SIZE or SIZE@STEP items, e.g. 64,128@3000") from None
            if (i == 0) != (stage[0] == 0) or stage[1] <= 0 or (self.stages and stage[0] <= self.stages[-1][0]):
                raise ValueError(f"bad crop schedule {spec!r}: the first size starts at step 0, the others at increasing steps")
            self.stages.append(stage)

    def __call__(self, step: int) -> int:
        return next(size for start, size in reversed(self.stages) if step >= start)


class SeededSampler(Sampler):
    """Yields (index, seed, crop) triples: an epoch of ``epoch_size`` draws (a permutation,
    repeated as needed), split across ranks, from a generator seeded by (seed, epoch); ``crop``
    is ``crop_schedule`` at the training step whose batch the item falls in (every epoch has the
    same number of batches of ``batch_size``). ``skip`` drops the first items, so a run
    interrupted mid-epoch resumes on exactly the next batch."""

    def __init__(self, n: int, epoch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 crop_schedule=None, batch_size: int = 1):  # fmt: skip
        self.n, self.epoch_size, self.seed, self.rank, self.world, self.shuffle = n, epoch_size, seed, rank, world, shuffle
        self.crop_schedule, self.batch_size = crop_schedule or (lambda step: None), batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(self.epoch_size / self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        reps = math.ceil(self.epoch_size / self.n)
        order = [torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n) for _ in range(reps)]
        indices = torch.cat(order)[: self.epoch_size].tolist()
        seeds = torch.randint(0, 2**31 - 1, (len(indices),), generator=g).tolist()
        items = list(zip(indices, seeds))
        items += items[: len(self) * self.world - len(items)]  # equal share on every rank
        mine = items[self.rank :: self.world]
        first_step = self.epoch * math.ceil(len(mine) / self.batch_size)
        mine = [(i, seed, self.crop_schedule(first_step + p // self.batch_size)) for p, (i, seed) in enumerate(mine)]
        return iter(mine[self.skip :])


class CachedLatents(Dataset):
    """Items of a (n, M, h, w) latent tensor, indexed by ``SeededSampler``'s triples."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, item) -> torch.Tensor:
        return self.latents[item[0] if isinstance(item, tuple) else item]


@torch.no_grad()
def cache_latents(g_a: nn.Module, crops: ImageFolderCrops, items: list[tuple], path: Path, batch_size: int,
                  device: torch.device, save: bool = True) -> torch.Tensor:  # fmt: skip
    """The fp32 latents g_a gives ``crops[item]`` for each item, (len(items), M, h, w) on the CPU.
    ``path`` keeps them with a key of g_a's weights, the files and the items: a later run (or a
    resumed one) with the same transform and crops loads them instead of computing them again."""
    key = hashlib.sha256(repr((items, [str(f) for f in crops.files], crops.downscale)).encode())
    for name, tensor in sorted(g_a.state_dict().items()):
        key.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
    key = key.hexdigest()
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return stored["latents"]
    was_training = g_a.training
    g_a.eval()
    parts = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"caching {len(items)} latents", leave=False, dynamic_ncols=True):
        x = torch.stack([crops[item] for item in items[start : start + batch_size]]).to(device)
        parts.append(g_a(x).float().cpu())
    g_a.train(was_training)
    latents = torch.cat(parts)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        lic_common.save_checkpoint({"key": key, "latents": latents}, path)
    return latents


def split_files(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """A deterministic split by a hash of each file name (the same on every machine and run)."""
    if len(files) < 2:
        raise ValueError("need at least two images to hold some out for validation; pass --val_data_path")
    ranked = sorted(files, key=lambda p: zlib.crc32(p.name.encode()))
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = set(ranked[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


# ---- Loss and schedule ----


class RateDistortionLoss(nn.Module):
    """loss = D + lambda_rate * bpp (see the module docstring)."""

    def __init__(self, lambda_rate: float, distortion: str = "mse"):
        super().__init__()
        self.lambda_rate, self.distortion = lambda_rate, distortion

    def forward(self, out: dict, x: torch.Tensor, lambdas: torch.Tensor | None = None) -> dict:
        """``lambdas``: one rate weight per image (variable-rate training) instead of ``lambda_rate``."""
        x_hat = out["x_hat"].float()
        num_pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        likelihoods = {k: v if v.dtype == torch.float64 else v.float() for k, v in out["likelihoods"].items()}
        bpp = lic_common.bpp_from_likelihoods(likelihoods, num_pixels)
        mse = F.mse_loss(x_hat, x)
        if self.distortion == "mse":
            distortion = mse
        else:
            distortion = 1 - lic_common.ms_ssim(x, x_hat)
        if lambdas is None:
            loss = distortion + self.lambda_rate * bpp
        else:  # mean over images of D_b + lambda_b * R_b, R_b each image's own bits
            bits = sum(-v.log2().flatten(1).sum(1) for v in likelihoods.values())
            loss = distortion + (lambdas.to(bits.dtype) * bits).sum() / num_pixels
        psnr = -10 * torch.log10(mse.detach().clamp_min(1e-10))
        return {"loss": loss, "mse": mse, "bpp": bpp, "psnr": psnr}


class RateLoss(nn.Module):
    """loss = bpp, for the entropy model alone on cached latents (``--cache_latents``): with g_a and
    g_s frozen, the distortion does not depend on what trains. ``pixel_factor``: image pixels per
    latent element (the transform's downsampling factor squared)."""

    def __init__(self, pixel_factor: int):
        super().__init__()
        self.pixel_factor = pixel_factor

    def forward(self, out: dict, y: torch.Tensor, lambdas: torch.Tensor | None = None) -> dict:
        likelihoods = {k: v if v.dtype == torch.float64 else v.float() for k, v in out["likelihoods"].items()}
        bpp = lic_common.bpp_from_likelihoods(likelihoods, y.shape[0] * y.shape[-2] * y.shape[-1] * self.pixel_factor)
        return {"loss": bpp, "bpp": bpp}


class LRSchedule:
    """Learning rate as a function of training progress in [0, 1]: linear warm-up over
    ``warmup_steps``, then ``constant`` or ``cosine`` decay to ``min_lr_ratio`` x the base rate.
    Progress is the larger of steps done / step budget and time spent / time budget, so a run
    bounded by minutes still anneals."""

    def __init__(self, optimizer, kind: str, warmup_steps: int, min_lr_ratio: float):
        self.optimizer, self.kind, self.warmup_steps, self.min_lr_ratio = optimizer, kind, warmup_steps, min_lr_ratio
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def factor(self, step: int, progress: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "constant":
            return warm
        return warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def step(self, step: int, progress: float) -> None:
        f = self.factor(step, progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def state_dict(self) -> dict:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.warmup_steps = state["kind"], state["warmup_steps"]
        self.min_lr_ratio, self.base_lrs = state["min_lr_ratio"], state["base_lrs"]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(main, auxiliary) trainable parameters; the auxiliary ones are the ``quantiles``."""
    main, aux = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (aux if name.endswith("quantiles") else main).append(p)
    return main, aux


def time_training_steps(models: dict[str, nn.Module], criterion: nn.Module, x: torch.Tensor, steps: int,
                        lr: float = 1e-4, aux_lr: float = 1e-3, amp: bool = False,
                        settings: dict[str, dict] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of each plain training step (forward, loss, backward, both Adam steps; no data
    loading) of several models, interleaved step by step so they see the same machine state;
    ``amp``: forward under bfloat16 autocast, as ``--amp`` trains. ``settings`` overrides per
    model: {"amp": bool, "channels_last": bool} (the batch in NHWC; the model must be converted
    by the caller). The benchmarks' throughput and step budgets come from here."""
    settings = settings or {}
    state = {}
    for name, model in models.items():
        main, aux = split_parameters(model.train())
        opts = settings.get(name, {})
        fmt = torch.channels_last if opts.get("channels_last") else torch.contiguous_format
        state[name] = (model, torch.optim.Adam(main, lr), torch.optim.Adam(aux, aux_lr), [],
                       x.contiguous(memory_format=fmt), opts.get("amp", amp))  # fmt: skip
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # CUDA runs asynchronously: time finished work
    for _ in range(steps):
        for model, opt, aux_opt, times, batch, use_amp in state.values():
            sync()
            start = time.perf_counter()
            with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(batch)
            loss = criterion(out, batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            aux_loss = model.aux_loss()
            aux_opt.zero_grad()
            aux_loss.backward()
            aux_opt.step()
            sync()
            times.append(time.perf_counter() - start)
    return {name: entry[3] for name, entry in state.items()}


# ---- Command line ----


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " loss = D + lambda_rate * bpp.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=lic_common.ARCHITECTURE, choices=MODEL_CHOICES, help="architecture to train")
    g.add_argument("--quality", type=int, default=None, choices=range(1, 9), help="CompressAI architectures: take N and M from the zoo's config for this quality (else --N/--M)")
    g.add_argument("--bk_sdm_path", default="nota-ai/bk-sdm-small", help="diffusers folder or hub id of BK-SDM (pretrained parts only)")
    g.add_argument("--N", type=int, default=128, help="channels of the transforms and of z")
    g.add_argument("--M", type=int, default=128, help="latent channels (the VAE's with --use_pretrained_vae)")
    g.add_argument("--diffusion_steps", type=int, default=4, help="reverse steps of the masked-diffusion prior, each revealing one group of the latent (0: the hyper-decoder alone)")
    g.add_argument("--reveal", default="checkerboard", choices=lic_common.REVEALS, help="the groups: steps/2 channel slices x 2 checkerboard halves, or steps channel slices")
    g.add_argument("--latent_denoise", action=argparse.BooleanOptionalAction, default=False, help="a last U-Net pass removes what is left of the quantization error (off: sharing the U-Net, it cost the reveal steps their context)")
    g.add_argument("--diffusion_strength", type=float, default=None, help="fraction of the U-Net's timestep range the chain covers (default 1.0 from scratch, 0.2 with BK-SDM's U-Net)")
    g.add_argument("--mode", default="residual", choices=lic_common.MODES, help="code the residual around the prediction, or z only")
    g.add_argument("--use_pretrained_vae", action=argparse.BooleanOptionalAction, default=False, help="BK-SDM's VAE as analysis/synthesis")
    g.add_argument("--use_pretrained_unet", action=argparse.BooleanOptionalAction, default=False, help="BK-SDM's U-Net as the denoiser")
    g.add_argument("--finetune_pretrained", action=argparse.BooleanOptionalAction, default=False, help="train the pretrained parts too (frozen otherwise)")
    g.add_argument("--unet_channels", type=int, default=64, help="width of the from-scratch U-Net's first level")
    g.add_argument("--unet_levels", type=int, default=2, help="resolution levels of the from-scratch U-Net")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lambda_rate", type=float, default=1e-4, help="rate weight; larger compresses harder (CompressAI quality q: 1 / (255^2 lmbda_q)); with --rate_levels, the one the starting weights were trained at")
    g.add_argument("--rate_levels", type=int, default=0, help="the codec: variable rate with this many trained quality levels, rate weights log-spaced from --lambda_max (quality 1) to --lambda_min (0: one rate, --lambda_rate)")
    g.add_argument("--lambda_max", type=float, default=1.7e-2, help="with --rate_levels: the rate weight of quality 1 (the smallest files)")
    g.add_argument("--lambda_min", type=float, default=1.7e-4, help="with --rate_levels: the rate weight of the highest quality")
    g.add_argument("--distortion", default="mse", choices=("mse", "ms-ssim"), help="D in the loss")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the model")
    g.add_argument("--aux_lr", type=float, default=1e-3, help="Adam learning rate of the entropy bottleneck's quantiles")
    g.add_argument("--lr_schedule", default="cosine", choices=("cosine", "constant"), help="decay after warm-up, over the step or time budget")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear learning-rate warm-up")
    g.add_argument("--min_lr_ratio", type=float, default=0.05, help="cosine decays to this fraction of --lr")
    g.add_argument("--clip_max_norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--batch_size", type=int, default=4, help="images per step on each process")
    g.add_argument("--epochs", type=int, default=100, help="epochs to train")
    g.add_argument("--epoch_size", type=int, default=0, help="random crops per epoch (0: one per training image)")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: no step budget)")
    g.add_argument("--time_budget", type=float, default=0.0, help="stop after this many minutes of training (0: none)")
    g.add_argument("--budget_clock", default="wall", choices=("wall", "process"), help="what --time_budget counts: wall time, or this process's CPU time (all threads; steady when other work shares the machine)")
    g.add_argument("--teacher_forcing", default="all", choices=("all", "sampled"), help="codec: train every reverse step for every image (S U-Net passes a batch), or one stratified-sampled step per image (one pass; the rate weighted to stay unbiased)")
    g.add_argument("--decoder_ste_from", type=float, default=None, help="codec: from this fraction of training on, the synthesis transform trains on the rounded latent (straight-through) instead of the noisy proxy (default: never)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (autocast; entropy models stay fp32) on CUDA and on the CPU")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format for the model and batches (1.2x a bfloat16 step on this project's CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the training forward pass (the first steps compile: minutes on a CPU)")
    g.add_argument("--amp_dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype (the CPU takes bfloat16 only)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="folder of training images (searched recursively)")
    g.add_argument("--val_data_path", default=None, help="folder of validation images (default: a held-out share of --data_path)")
    g.add_argument("--val_fraction", type=float, default=0.1, help="share of --data_path held out when there is no --val_data_path")
    g.add_argument("--image_size", type=int, default=256, help="training crop size")
    g.add_argument("--crop_schedule", default=None, help="training crop size by step instead, e.g. 64,128@3000,256@9000 (64 px, 128 px from step 3000, 256 px from step 9000)")
    g.add_argument("--downscale_min", type=float, default=1.0, help="training crops come from the image downscaled by a random factor in [downscale_min, downscale_max] (1 1: none)")
    g.add_argument("--downscale_max", type=float, default=1.0, help="see --downscale_min")
    g.add_argument("--val_image_size", type=int, default=256, help="validation centre-crop size")
    g.add_argument("--num_workers", type=int, default=2, help="data-loading workers per process")
    g.add_argument("--cache_images_mb", type=float, default=1024, help="decoded images kept in memory per worker (MB, 8-bit; 0: none)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./outputs", help="everything the run writes goes here")
    g.add_argument("--resume", default=None, help="checkpoint to continue from ('last': output_dir/last_checkpoint.pth)")
    g.add_argument("--calibration_crops", type=int, default=8, help="the codec: training crops that set the exact integer entropy model's ranges each time best_checkpoint.pth is saved")
    g.add_argument("--init_transforms", default=None, help="the codec: start g_a, g_s, h_a, h_s and the entropy bottleneck from a trained mean-scale model, ARCH:QUALITY of CompressAI's zoo (pretrained=True, e.g. mbt2018-mean:4) or a checkpoint file (this project's or CompressAI's examples/train.py)")
    g.add_argument("--freeze", nargs="*", default=[], choices=TRANSFORM_PARTS, help="the codec: parts that do not train (e.g. g_a g_s with --init_transforms: the entropy model alone trains)")
    g.add_argument("--cache_latents", type=int, default=0, help="with --freeze g_a g_s: train the entropy model on the latents of this many training crops, computed once (0: train on images)")
    g.add_argument("--latent_cache", default=None, help="file that keeps the --cache_latents latents, for later runs on the same transform and crops (default: output_dir/latents.pth)")
    g.add_argument("--patience", type=int, default=0, help="stop when the validation loss has not improved for this many validations (0: never)")
    g.add_argument("--init_from", default=None, help="start a new run (new optimizer, schedule and step count) from the model of this checkpoint (a training one, e.g. another rate point's, or a codec checkpoint such as a shipped one); its architecture and sizes replace --model/--N/--M")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--val_interval", type=int, default=1, help="validate (and save best) every this many epochs")
    g.add_argument("--save_every", type=int, default=10, help="also keep checkpoint_<epoch>.pth every this many epochs (0: never)")
    g.add_argument("--log_interval", type=int, default=10, help="steps between TensorBoard scalars")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    args = p.parse_args(argv)
    if args.quality is not None and args.model == lic_common.ARCHITECTURE:
        p.error("--quality selects a CompressAI architecture's size; use --N/--M for the codec")
    positive = ("N", "M", "unet_channels", "unet_levels", "batch_size", "epochs", "image_size", "val_image_size",
                "calibration_crops", "val_interval", "log_interval")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("diffusion_steps", "epoch_size", "max_steps", "num_workers", "warmup_steps", "save_every", "time_budget",
                 "cache_images_mb", "cache_latents", "patience"):  # fmt: skip
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not (args.lambda_rate > 0 and args.lr > 0 and args.aux_lr > 0):
        p.error("--lambda_rate, --lr and --aux_lr must be > 0")
    if (args.init_transforms or args.freeze) and args.model != lic_common.ARCHITECTURE:
        p.error("--init_transforms and --freeze are for the codec (--model diffusion-hyperprior)")
    if args.init_transforms and args.init_from:
        p.error("--init_transforms starts a codec's transforms; --init_from the whole codec: give one")
    if args.rate_levels and not (args.rate_levels >= 2 and 0 < args.lambda_min < args.lambda_max and args.model == lic_common.ARCHITECTURE):
        p.error("--rate_levels must be 0 or >= 2, with 0 < --lambda_min < --lambda_max, for the codec (--model diffusion-hyperprior)")
    if not 0 < args.val_fraction < 1 or not 0 <= args.min_lr_ratio <= 1 or args.clip_max_norm < 0:
        p.error("need 0 < --val_fraction < 1, 0 <= --min_lr_ratio <= 1 and --clip_max_norm >= 0")
    if not 0 < args.downscale_min <= args.downscale_max <= 1:
        p.error(f"need 0 < --downscale_min <= --downscale_max <= 1, got {args.downscale_min} and {args.downscale_max}")
    if args.cache_latents and not ({"g_a", "g_s"} <= set(args.freeze) and args.mode == "residual" and not args.rate_levels
                                   and args.decoder_ste_from is None and not args.use_pretrained_vae and not args.crop_schedule):  # fmt: skip
        p.error("--cache_latents trains the entropy model alone: it needs --freeze g_a g_s (and no --rate_levels, --decoder_ste_from, "
                "--mode z_only or --use_pretrained_vae, which make the distortion depend on it, nor --crop_schedule)")
    if args.teacher_forcing == "sampled" and args.decoder_ste_from is not None:
        p.error("--decoder_ste_from needs every step's means: use it with --teacher_forcing all")
    if args.decoder_ste_from is not None and (args.model != lic_common.ARCHITECTURE or not 0 <= args.decoder_ste_from <= 1):
        p.error("--decoder_ste_from is a fraction of training in [0, 1], for the codec only")
    try:
        CropSchedule(args.crop_schedule or str(args.image_size))
    except ValueError as e:
        p.error(str(e))
    return resumed_args(p, args, argv) if args.resume else args


# What a resumed run may change: how long and how it runs. Anything else (lambda, model, data,
# crops, optimiser) would make it another experiment, so it comes from the run's configuration.
RESUME_MAY_CHANGE = frozenset({
    "epochs", "max_steps", "time_budget", "budget_clock", "num_workers", "cache_images_mb", "device", "compile",
    "val_interval", "save_every", "log_interval", "progress", "calibration_crops", "patience", "latent_cache",
})  # fmt: skip


def resumed_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """A resumed run is the same run: every setting comes from its checkpoint's configuration; an
    explicit flag overrides one of ``RESUME_MAY_CHANGE`` (a printed line says so) and is refused
    for any other setting it would change (start another run from its weights with --init_from)."""
    path = Path(args.output_dir) / "last_checkpoint.pth" if args.resume == "last" else Path(args.resume)
    return lic_common.resumed_settings(parser, args, argv, path, ("run_config", "args"), RESUME_MAY_CHANGE,
                                       own=("resume", "output_dir"))  # fmt: skip


# ---- Training ----


@dataclasses.dataclass
class RunState:
    """What a checkpoint restores besides the modules."""

    epoch: int = 0
    batches_done: int = 0  # of the current epoch, when interrupted mid-epoch
    step: int = 0
    best_loss: float = math.inf
    stale: int = 0  # validations since the best one, for --patience
    elapsed: float = 0.0  # seconds of training on --budget_clock, for --time_budget


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    """Owns the model, optimizers, data and outputs of one run; ``fit`` trains it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.output_dir)
        self.rank, self.world = lic_common.setup_distributed(args.device)
        self.is_main = self.rank == 0
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.state = RunState()
        self.signal_received = None  # SIGINT / SIGTERM number: stop after the step in progress
        self.interrupted = False  # a signal was received on some rank, as all ranks agree
        resume_ckpt = self._resume_checkpoint()
        init_ckpt = self._init_checkpoint(args.init_from) if args.init_from and not resume_ckpt else None
        source = resume_ckpt or init_ckpt
        self.config = source["run_config"]["model"] if source else model_config(args)
        if init_ckpt and args.rate_levels and self.config["architecture"] == bk.ARCHITECTURE:
            self.config = self._variable_rate_from(init_ckpt)
        lic_common.seed_everything(args.seed)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = set_training_options(build_model(self.config), args).to(self.device, memory_format=self.memory_format)
        self.levels = self.model.config.rate_levels if isinstance(self.model, bk.DiffusionHyperprior) else 0
        if self.levels and not source:
            with torch.no_grad():
                self.model.log_steps.copy_(initial_log_steps(self.model.config.quality_lambdas, args.lambda_rate, self.model.config.M))
        for part in args.freeze:  # before the optimizers are made: they hold what trains
            getattr(self.model, part).requires_grad_(False)
        self.latent_mode = args.cache_latents > 0
        self.criterion = RateLoss(self.model.latent_factor**2) if self.latent_mode else RateDistortionLoss(args.lambda_rate, args.distortion)
        main_params, aux_params = split_parameters(self.model)
        self.optimizer = torch.optim.Adam(main_params, lr=args.lr)
        self.aux_optimizer = torch.optim.Adam(aux_params, lr=args.aux_lr)
        self.schedule = LRSchedule(self.optimizer, args.lr_schedule, args.warmup_steps, args.min_lr_ratio)
        if args.amp and self.device.type == "cpu" and args.amp_dtype != "bfloat16":
            raise ValueError("--amp on the CPU takes --amp_dtype bfloat16 (or pass --no-amp)")
        use_amp = args.amp and self.device.type in ("cuda", "cpu")
        self.amp_dtype = getattr(torch, args.amp_dtype) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and args.amp_dtype == "float16")
        self.train_loader, self.val_loader = self._build_data()
        copied = []
        if resume_ckpt:
            self._restore(resume_ckpt)
        elif init_ckpt:
            self._load_model_state(init_ckpt["state_dict"])
        elif args.init_transforms:
            copied = copy_transforms(self.model, transforms_source(args.init_transforms), args.init_transforms)
        if self.latent_mode:  # after the weights are in place: the latents are the frozen g_a's
            self.train_loader, self.val_loader = self._latent_data()
        self.net = self._training_module()
        self.writer, self.log = self._build_outputs()
        if warning := lic_common.cpu_amp_warning(self.device, args.amp):
            self.log.warning(warning)
        if copied:
            parts = sorted({k.split(".")[0] for k in copied})
            self.log.info(f"--init_transforms {args.init_transforms}: {len(copied)} tensors of {', '.join(parts)} copied"
                          + (f"; frozen: {', '.join(args.freeze)}" if args.freeze else ""))  # fmt: skip

    # -- construction --

    def _resume_checkpoint(self) -> dict | None:
        if not self.args.resume:
            return None
        return self._training_checkpoint(self.out / "last_checkpoint.pth" if self.args.resume == "last" else self.args.resume)

    @staticmethod
    def _training_checkpoint(path) -> dict:
        path = Path(path)
        ckpt = lic_common.load_checkpoint(path)
        if "run_config" not in ckpt:
            raise lic_common.CheckpointError(f"{path} is not a training checkpoint of this script (no run_config)")
        if ckpt["run_config"]["model"]["architecture"] == bk.ARCHITECTURE:
            bk.check_codec_checkpoint(ckpt, path, formats=(2, bk.CODEC_FORMAT))  # format 2's weights still train
        return ckpt

    def _variable_rate_from(self, init_ckpt: dict) -> dict:
        """--init_from a fixed-rate codec with --rate_levels: its config with the quality levels, its
        weights with quantization steps that start from ``initial_log_steps``."""
        codec = dict(init_ckpt["run_config"]["model"]["codec"])
        if codec.get("quality_lambdas"):
            raise ValueError("--init_from is already variable-rate: leave --rate_levels out (its levels are kept)")
        codec["quality_lambdas"] = quality_lambdas(self.args)
        init_ckpt["state_dict"] = dict(init_ckpt["state_dict"]) | {
            "log_steps": initial_log_steps(codec["quality_lambdas"], self.args.lambda_rate, codec["M"])}
        return {"architecture": bk.ARCHITECTURE, "codec": codec}

    @classmethod
    def _init_checkpoint(cls, path) -> dict:
        """What ``--init_from`` starts from: a training checkpoint, or a codec checkpoint (a
        shipped or slim one: its config and weights)."""
        ckpt = lic_common.load_checkpoint(Path(path))
        if "run_config" in ckpt or ckpt.get("architecture") != bk.ARCHITECTURE:
            return cls._training_checkpoint(path)
        bk.check_codec_checkpoint(ckpt, path)
        return {"run_config": {"model": {"architecture": bk.ARCHITECTURE, "codec": ckpt["config"]}}, "state_dict": ckpt["state_dict"]}

    def _build_data(self) -> tuple[DataLoader, DataLoader]:
        args = self.args
        files = lic_common.list_images(args.data_path)
        if args.val_data_path:
            train_files, val_files = files, lic_common.list_images(args.val_data_path)
        else:
            train_files, val_files = split_files(files, args.val_fraction)
        self.train_files, self.val_files = train_files, val_files
        crops = CropSchedule(args.crop_schedule or str(args.image_size))
        train_set = ImageFolderCrops(train_files, args.image_size, train=True, cache_mb=args.cache_images_mb,
                                     downscale=(args.downscale_min, args.downscale_max))  # fmt: skip
        val_set = ImageFolderCrops(val_files, args.val_image_size, train=False, cache_mb=args.cache_images_mb)
        epoch_size = args.epoch_size or len(train_files)
        self.sampler = SeededSampler(len(train_files), epoch_size, args.seed, self.rank, self.world,
                                     crop_schedule=crops, batch_size=args.batch_size)  # fmt: skip
        val_sampler = SeededSampler(len(val_files), len(val_files), 0, self.rank, self.world, shuffle=False)
        # the loaders get generators of their own, so they never draw from the global RNG
        common = dict(num_workers=args.num_workers, pin_memory=self.device.type == "cuda",
                      persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        train = DataLoader(train_set, batch_size=args.batch_size, sampler=self.sampler, drop_last=False, **common)
        val = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, **common)
        return train, val

    def _latent_data(self) -> tuple[DataLoader, DataLoader]:
        """--cache_latents: loaders of the frozen g_a's latents of N training crops and of N / 8
        (at least one per image) random crops of the validation images, both fixed by the seed."""
        args = self.args
        path = Path(args.latent_cache) if args.latent_cache else self.out / "latents.pth"
        sets = {}
        for name, files, size, count, seed, where in (
            ("train", self.train_files, args.image_size, args.cache_latents, args.seed, path),
            ("val", self.val_files, args.val_image_size, max(len(self.val_files), args.cache_latents // 8), args.seed + 1,
             path.with_name(f"{path.stem}_val{path.suffix}")),
        ):  # fmt: skip
            crops = ImageFolderCrops(files, size, train=True, cache_mb=args.cache_images_mb, downscale=(args.downscale_min, args.downscale_max))
            items = list(SeededSampler(len(files), count, seed, crop_schedule=CropSchedule(str(size))))
            sets[name] = CachedLatents(cache_latents(self.model.g_a, crops, items, where, args.batch_size, self.device, save=self.is_main))
        self.sampler = SeededSampler(len(sets["train"]), args.epoch_size or len(sets["train"]), args.seed, self.rank, self.world,
                                     batch_size=args.batch_size)  # fmt: skip
        val_sampler = SeededSampler(len(sets["val"]), len(sets["val"]), 0, self.rank, self.world, shuffle=False)
        return (DataLoader(sets["train"], batch_size=args.batch_size, sampler=self.sampler),
                DataLoader(sets["val"], batch_size=args.batch_size, sampler=val_sampler))  # fmt: skip

    def _training_module(self) -> nn.Module:
        """The module the training steps call: the model, in DDP with several processes, compiled
        with ``--compile``. Checkpoints and validation use ``self.model`` itself."""
        net = self.model if self.world == 1 else self._ddp()
        return torch.compile(net) if self.args.compile else net

    def _ddp(self) -> nn.Module:
        # the quantiles train on the auxiliary loss alone, identical on every rank: keep them out
        # of DDP's gradient reduction; the entropy coder's tables are rebuilt, not broadcast
        ignore = [n for n, _ in self.model.named_parameters() if n.endswith("quantiles")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignore)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)

    def _build_outputs(self):
        if not self.is_main:
            return None, logging.getLogger("train.silent")
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "samples").mkdir(exist_ok=True)
        config = {"args": vars(self.args), "model": self.config, "world_size": self.world}
        (self.out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        log = logging.getLogger(f"train.{self.out}")
        log.setLevel(logging.INFO)
        log.handlers.clear()
        log.propagate = False
        for handler in (logging.FileHandler(self.out / "training.log"), logging.StreamHandler(sys.stdout)):
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(f"{self.config['architecture']}: {n_trainable / 1e6:.2f} M trainable parameters, "
                 f"{len(self.train_loader.dataset)} training / {len(self.val_loader.dataset)} validation images, "
                 f"device {self.device}, {self.world} process(es)")  # fmt: skip
        return SummaryWriter(self.out / "tensorboard"), log

    # -- checkpoints --

    def _load_model_state(self, model_state: dict) -> None:
        if self.config["architecture"] == bk.ARCHITECTURE:
            self.model.load_trainable_state_dict(model_state)
        else:
            self.model.load_state_dict(model_state)

    def _restore(self, ckpt: dict) -> None:
        self._load_model_state(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        self.schedule.load_state_dict(ckpt["lr_schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["run_state"])
        lic_common.set_rng_state(ckpt["rng"])

    def save_checkpoint(self, path: Path, update_tables: bool = False) -> None:
        """Model (the raw module), optimizers, schedule, scaler, progress, RNG and config."""
        if not self.is_main:
            return
        if update_tables:
            if self.config["architecture"] == bk.ARCHITECTURE:  # the exact form's ranges, from training crops
                files = self.train_files
                self.model.calibrate(bk.calibration_crops(files, self.args.calibration_crops, min(self.args.image_size, 256)))
            self.model.update(force=True)
        state = checkpoint_model_state(self.model, self.config)
        state.update(
            optimizer=self.optimizer.state_dict(),
            aux_optimizer=self.aux_optimizer.state_dict(),
            lr_schedule=self.schedule.state_dict(),
            scaler=self.scaler.state_dict(),
            run_state=dataclasses.asdict(self.state),
            rng=lic_common.rng_state(),
            run_config={"args": vars(self.args), "model": self.config},
        )
        lic_common.save_checkpoint(state, path)

    # -- loops --

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def budget_left(self) -> bool:
        a, s = self.args, self.state
        if a.max_steps and s.step >= a.max_steps:
            return False
        return not (a.time_budget and s.elapsed >= a.time_budget * 60)

    def should_stop(self) -> bool:
        """The budget is spent or a stop signal came, as rank 0 and every other rank agree: ranks
        measure time and receive signals apart, and one leaving the loop early would leave the
        others waiting in a collective."""
        flags = torch.tensor([float(not self.budget_left()), float(self.signal_received is not None)])
        if self.world > 1:
            flags = flags.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.interrupted = bool(flags[1].item())
        return bool(flags.max().item())

    @contextmanager
    def stop_on_signals(self):
        """SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) stop training after the step in
        progress, with ``last_checkpoint.pth`` saved there; a second signal stops at once, saving
        nothing (the checkpoint saved before stays). Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.signal_received is not None:
                raise KeyboardInterrupt
            self.signal_received = signum
            self.log.warning(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once, unsaved)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def progress(self) -> float:
        a, s = self.args, self.state
        steps_total = a.max_steps or a.epochs * len(self.train_loader)
        by_time = s.elapsed / (a.time_budget * 60) if a.time_budget else 0.0
        return max(s.step / steps_total, by_time)

    def train_one_epoch(self, epoch: int) -> dict:
        self.net.train()
        self.sampler.set_epoch(epoch, skip=self.state.batches_done * self.args.batch_size)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", disable=not (self.is_main and self.args.progress),
                   initial=self.state.batches_done, total=len(self.train_loader), dynamic_ncols=True, leave=False)  # fmt: skip
        sums, count, images, crop, wall_start = {}, 0, 0, 0, time.perf_counter()
        clock = time.process_time if self.args.budget_clock == "process" else time.perf_counter
        tick = clock()
        for x in bar:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            if self.args.decoder_ste_from is not None:
                self.model.decoder_ste = self.progress() >= self.args.decoder_ste_from
            quality = lambdas = None
            if self.levels:  # variable rate: a quality per image, uniform over the trained range
                quality = 1 + torch.rand(x.shape[0], device=self.device) * (self.levels - 1)
                lambdas = self.model.quality_lambda(quality)
            with self.autocast():
                if self.latent_mode:
                    out = self.net(x, latent=True)
                else:
                    out = self.net(x) if quality is None else self.net(x, quality=quality)
            losses = self.criterion(out, x, lambdas)
            if not torch.isfinite(losses["loss"]):
                raise TrainingDiverged(
                    f"loss is {losses['loss'].item()} at step {self.state.step} (epoch {epoch}); stopped without "
                    f"saving. The last good checkpoint is {self.out / 'last_checkpoint.pth'}: resume from it with "
                    "a lower --lr or a tighter --clip_max_norm."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            if self.args.clip_max_norm > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.args.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            aux_loss = self.model.aux_loss()
            self.aux_optimizer.zero_grad(set_to_none=True)
            aux_loss.backward()
            self.aux_optimizer.step()

            now = clock()
            self.state.elapsed += now - tick
            tick = now
            self.state.step += 1
            self.state.batches_done += 1
            self.schedule.step(self.state.step, self.progress())
            values = {k: v.item() for k, v in losses.items()} | {"aux": aux_loss.item()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            images, crop = images + x.shape[0] * self.world, x.shape[-1]
            bar.set_postfix(loss=f"{values['loss']:.4f}", bpp=f"{values['bpp']:.3f}", psnr=f"{values.get('psnr', math.nan):.2f}")
            if self.writer and self.state.step % self.args.log_interval == 0:
                for k, v in values.items():
                    self.writer.add_scalar(f"train/{k}", v, self.state.step)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.state.step)
            if self.should_stop():
                break
        bar.close()
        throughput = images / max(time.perf_counter() - wall_start, 1e-9)  # data loading included
        if self.writer:
            self.writer.add_scalar("train/images_per_second", throughput, self.state.step)
        return {k: v / max(count, 1) for k, v in sums.items()} | {"images_per_second": throughput, "crop": crop}

    def validation_qualities(self) -> list[float | None]:
        """The rate points validated: a variable-rate model's lowest, middle and highest quality."""
        return [1.0, (1 + self.levels) / 2, float(self.levels)] if self.levels else [None]

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Validation loss, bpp estimate and PSNR on centre crops (averaged over all ranks); a
        variable-rate model's at several qualities (``q<Q>_bpp``, ...), the loss their mean."""
        self.model.eval()
        points = {}
        for quality in self.validation_qualities():
            points[quality], first = self._evaluate_at(quality)
        metrics = {k: sum(p[k] for p in points.values()) / len(points) for k in next(iter(points.values()))}
        if self.levels:
            metrics |= {f"q{q:g}_{k}": v for q, p in points.items() for k, v in p.items()}
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, self.state.step)
            if self.levels:  # the rate-distortion curve at this step
                for q, p in points.items():
                    self.writer.add_scalars("val/rd_curve_psnr_x1000bpp", {f"q{q:g}": p["psnr"]}, round(1000 * p["bpp"]))
        if self.writer and first is not None:
            x, x_hat = first
            self.writer.add_images("val/original_reconstruction", torch.stack([x, x_hat.clamp(0, 1)]), self.state.step)
            lic_common.save_image(x_hat, self.out / "samples" / f"epoch{epoch:04d}.png")
        return metrics

    def _evaluate_at(self, quality: float | None) -> tuple[dict, tuple]:
        totals = torch.zeros(5, dtype=torch.float64)
        first = None
        for x in self.val_loader:
            x = x.to(self.device, memory_format=self.memory_format)
            lambdas = None
            with self.autocast():
                if self.latent_mode:
                    out = self.model(x, latent=True)
                elif quality is None:
                    out = self.model(x)
                else:
                    q = torch.full((x.shape[0],), quality, device=self.device)
                    out, lambdas = self.model(x, quality=q), self.model.quality_lambda(q)
            losses = self.criterion(out, x, lambdas)
            n = x.shape[0]
            if self.latent_mode:  # the rate alone: the distortion does not depend on what trains
                totals += torch.tensor([losses["loss"].item() * n, losses["bpp"].item() * n, 0, 0, n], dtype=torch.float64)
                continue
            totals += torch.tensor([losses["loss"].item() * n, losses["bpp"].item() * n, losses["mse"].item() * n,
                                    lic_common.psnr(x, out["x_hat"].float()) * n, n], dtype=torch.float64)  # fmt: skip
            if first is None:
                first = (x[0].float().cpu(), out["x_hat"][0].float().cpu())
        if self.world > 1:
            dist.all_reduce(totals)
        n = totals[4].item()
        if self.latent_mode:
            return {"loss": totals[0].item() / n, "bpp": totals[1].item() / n}, first
        return {"loss": totals[0].item() / n, "bpp": totals[1].item() / n, "mse": totals[2].item() / n, "psnr": totals[3].item() / n}, first

    def stop_here(self):
        """Save ``last_checkpoint.pth`` at the step just finished and stop (exit status 130)."""
        self.save_checkpoint(self.out / "last_checkpoint.pth")
        self.log.info(f"stopped at step {self.state.step}: saved {self.out / 'last_checkpoint.pth'}; --resume last goes on from there")
        raise KeyboardInterrupt

    def fit(self) -> dict:
        args, s = self.args, self.state
        self.log.info(f"training from epoch {s.epoch}, step {s.step}" + (f", batch {s.batches_done}" if s.batches_done else ""))
        val = {}
        try:
            with self.stop_on_signals():
                while s.epoch < args.epochs and not self.should_stop():
                    epoch = s.epoch
                    train = self.train_one_epoch(epoch)
                    finished = s.batches_done >= len(self.train_loader)
                    if finished:  # a budget or signal that ends mid-epoch leaves it open for --resume
                        s.epoch, s.batches_done = epoch + 1, 0
                    last = s.epoch >= args.epochs or self.should_stop()
                    if self.interrupted:
                        self.stop_here()
                    if (finished and epoch % args.val_interval == 0) or last:
                        val = self.evaluate(epoch)
                        improved = val["loss"] < s.best_loss
                        s.best_loss, s.stale = (val["loss"], 0) if improved else (s.best_loss, s.stale + 1)
                        self.log.info(
                            f"epoch {epoch} step {s.step}: {train.get('images_per_second', math.nan):.1f} img/s at "
                            f"{train.get('crop', 0)} px, train loss {train.get('loss', math.nan):.6f} "
                            f"bpp {train.get('bpp', math.nan):.3f} psnr {train.get('psnr', math.nan):.2f} | val loss "
                            f"{val['loss']:.6f} bpp {val['bpp']:.4f} psnr {val.get('psnr', math.nan):.2f}{' (best)' if improved else ''}"
                            + "".join(f" | q{q:g}: bpp {val[f'q{q:g}_bpp']:.3f} psnr {val[f'q{q:g}_psnr']:.2f}"
                                      for q in self.validation_qualities() if q is not None)
                        )
                        if improved:
                            self.save_checkpoint(self.out / "best_checkpoint.pth", update_tables=True)
                    if finished and args.save_every and s.epoch % args.save_every == 0:
                        self.save_checkpoint(self.out / f"checkpoint_{epoch}.pth")
                    self.save_checkpoint(self.out / "last_checkpoint.pth")
                    if args.patience and s.stale >= args.patience:
                        self.log.info(f"stopping: the validation loss has not improved for {s.stale} validations (--patience)")
                        break
                if self.interrupted:  # the signal came during validation or saving
                    self.stop_here()
        finally:
            if self.writer:
                self.writer.close()
        self.log.info(f"done: step {s.step}, epoch {s.epoch}, best validation loss {s.best_loss:.4f}")
        return {"step": s.step, "epoch": s.epoch, "best_loss": s.best_loss, "elapsed_seconds": s.elapsed, "stale_validations": s.stale,
                **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        trainer = Trainer(args)
        return trainer.fit()
    except (TrainingDiverged, lic_common.CheckpointError, bk.PretrainedError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

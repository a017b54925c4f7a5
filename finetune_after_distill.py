"""Student decoder: bmshj2018-factorized without transposed convolutions, by distillation.

Transposed convolutions with stride 2 leave checkerboard artifacts (Odena et al. 2016,
"Deconvolution and Checkerboard Artifacts"). The teacher is CompressAI's ``bmshj2018_factorized``
(Ballé et al. 2018). The student is a copy whose synthesis transform ``g_s`` has every
``ConvTranspose2d(k=5, s=2)`` replaced by ``Upsample(scale_factor=2) + Conv2d(k=5, padding=2)``,
each new convolution initialised to the least-squares best match of the layer it replaces. The
encoder and entropy model are shared, so by default the student decodes the teacher's bitstreams.

    y = g_a(x): (B, M, H/16, W/16), coded by the teacher's EntropyBottleneck
    teacher g_s: ConvTranspose2d x4 -> x_hat (B, 3, H, W)
    student g_s: (Upsample + Conv2d) x4 -> x_hat (B, 3, H, W)

Stages (one subcommand each):
    prepare   write 224x224 crops of an image folder (COCO train2017 in the original recipe),
              split into train/ and val/ by a hash of each file name
    distill   train the student towards the teacher's reconstruction of the same quantized latent
    finetune  train the student decoder against the original images
    eval      PSNR / MS-SSIM of teacher and student, bpp from real bitstreams, checkerboard energy

Loss in both stages: l1_weight * L1 + msssim_weight * (1 - MS-SSIM).

    python finetune_after_distill.py prepare --coco_dir ../shared/data/train --out_dir data224
    python finetune_after_distill.py distill --coco_dir data224 --teacher_checkpoint teacher.pth
    python finetune_after_distill.py finetune --coco_dir data224 --teacher_checkpoint teacher.pth
    python finetune_after_distill.py eval --data_path ../shared/data/kodak --checkpoint checkpoints_ft/ft_best.pt \
        --teacher_checkpoint teacher.pth
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import lic_common

if TYPE_CHECKING:  # CompressAI loads with the teacher (load_teacher), so that --help answers before it
    from compressai.models import FactorizedPrior

# ---- Building blocks ----


# Nearest x2 upsampling then a 5-tap convolution (padding 2), seen from the input: output 2i + p
# (phase p) is a 3-tap filter on in[i-1], in[i], in[i+1] whose taps are sums of the 5 taps v.
# Rows: (even, i-1) (even, i) (even, i+1) (odd, i-1) (odd, i) (odd, i+1); columns: v_0 .. v_4.
_PHASE_TAPS = ((1, 1, 0, 0, 0), (0, 0, 1, 1, 0), (0, 0, 0, 0, 1),
               (1, 0, 0, 0, 0), (0, 1, 1, 0, 0), (0, 0, 0, 1, 1))  # fmt: skip


class UpsampleConv(nn.Sequential):
    """Nearest-neighbour x2 upsampling then a 5x5 convolution: no uneven kernel overlap, hence no
    checkerboard pattern.

    The parameters are those of ``Upsample(2) + Conv2d(k=5, padding=2)`` and so is the result (to
    float rounding), but it is computed at the input's resolution: one 3x3 convolution per output
    phase, whose taps are sums of the 5x5 kernel's (``_PHASE_TAPS``), interleaved by
    ``pixel_shuffle``. That is 4 x 9 multiply-adds per input pixel and channel pair instead of
    4 x 25, which makes the student's decoder about as cheap as the teacher's.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 5, padding=2))

    def phase_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (4 * out, in, 3, 3) kernel and (4 * out,) bias of the phase convolution, in
        ``pixel_shuffle``'s channel order (channel, row phase, column phase)."""
        conv = self[1]
        taps = torch.tensor(_PHASE_TAPS, dtype=conv.weight.dtype, device=conv.weight.device).view(2, 3, 5)
        with torch.autocast(conv.weight.device.type, enabled=False):  # the tap sums in the weights' precision
            weight = torch.einsum("pak,oikl,qbl->opqiab", taps, conv.weight, taps)
        return weight.reshape(-1, *weight.shape[3:]), conv.bias.repeat_interleave(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.phase_weight()
        return F.pixel_shuffle(F.conv2d(x, weight, bias, padding=1), 2)


def _projection_1d() -> torch.Tensor:
    """The 5x5 map P from a ConvTranspose1d(k=5, s=2, p=2, output_padding=1) kernel w to the
    Conv1d(k=5, p=2) kernel v after nearest x2 upsampling that best reproduces it: v = P w.

    Both layers give every output as taps on in[i-1], in[i], in[i+1] (i = output // 2), with one
    set of taps per output phase. Writing those six taps as A v (upsample + conv, ``_PHASE_TAPS``)
    and B w (transposed conv), the least-squares v is pinv(A) B w; in 2D the maps are Kronecker
    products, so the kernel is P w P^T.
    """
    A = torch.tensor(_PHASE_TAPS, dtype=torch.float64)
    B = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.float64)  # fmt: skip
    return torch.linalg.pinv(A) @ B


def upsample_conv_like(layer: nn.ConvTranspose2d) -> UpsampleConv:
    """An ``UpsampleConv`` initialised as the least-squares best match of ``layer``."""
    if layer.stride != (2, 2) or layer.kernel_size != (5, 5) or layer.padding != (2, 2) or layer.output_padding != (1, 1):
        raise ValueError(f"expected CompressAI's deconv (k=5, s=2, p=2, output_padding=1), got {layer}")
    new = UpsampleConv(layer.in_channels, layer.out_channels)
    P = _projection_1d()
    with torch.no_grad():
        weight = torch.einsum("ab,iobc,dc->oiad", P, layer.weight.double(), P)  # (in,out,k,k) -> (out,in,k,k)
        new[1].weight.copy_(weight.to(layer.weight.dtype))
        new[1].bias.copy_(layer.bias)
    return new.to(layer.weight.device)


def make_student(teacher: FactorizedPrior) -> FactorizedPrior:
    """A deep copy of the teacher with every ConvTranspose2d of ``g_s`` replaced."""
    student = copy.deepcopy(teacher)
    for i, layer in enumerate(student.g_s):
        if isinstance(layer, nn.ConvTranspose2d):
            student.g_s[i] = upsample_conv_like(layer)
    return student


def load_student(student: FactorizedPrior, path) -> dict:
    """Load a student checkpoint of this script (a stage's, or ``slim_student``'s decoder alone)
    into ``student``, a ``make_student`` of the teacher; returns the checkpoint."""
    ckpt = lic_common.load_checkpoint(path)
    if ckpt.get("kind") != "student":
        raise lic_common.CheckpointError(f"{path} is not a student checkpoint of this script")
    state = ckpt["student"]
    if ckpt.get("decoder_only"):  # the rest is the teacher's, which make_student copied
        state = student.state_dict() | state
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise lic_common.CheckpointError(f"{path} does not fit this teacher's student: {e}") from e
    return ckpt


def slim_student(ckpt: dict) -> dict:
    """A student checkpoint to ship: its decoder ``g_s`` alone (the encoder and entropy model are
    the teacher's), fp16 where exact enough, and the stage's figures; no optimizer state."""
    decoder = {k: v for k, v in ckpt["student"].items() if k.startswith("g_s.")}
    return {"kind": "student", "decoder_only": True, "stage": ckpt["stage"], "epoch": ckpt["epoch"],
            "metrics": ckpt["metrics"], "student": lic_common.half_where_exact(decoder)}  # fmt: skip


def set_trainable(student: nn.Module, stage: str, train_igdn: bool = False, unfreeze_all: bool = False, freeze_igdn: bool = False) -> list[str]:
    """Freeze / unfreeze the student for a stage; returns the names of what trains.

    distill: the replaced convolutions (+ the inverse GDNs with ``train_igdn``; everything with
    ``unfreeze_all``). finetune: the whole decoder ``g_s`` (less its inverse GDNs with
    ``freeze_igdn``); the encoder and entropy model stay the teacher's.
    """
    with lic_common.quiet_compressai():  # imported where needed, not at the top: --help answers before it loads
        from compressai.layers import GDN

    student.requires_grad_(False)
    for module in student.g_s:
        if isinstance(module, UpsampleConv):
            module.requires_grad_(True)
        elif isinstance(module, GDN):
            module.requires_grad_(train_igdn if stage == "distill" else not freeze_igdn)
        elif stage == "finetune":
            module.requires_grad_(True)
    if stage == "distill" and unfreeze_all:
        student.requires_grad_(True)
    return [n for n, p in student.named_parameters() if p.requires_grad]


# ---- Teacher ----


def load_teacher(args: argparse.Namespace) -> FactorizedPrior:
    """CompressAI's pretrained model (downloads), or a local checkpoint: CompressAI's own
    (``state_dict`` / ``network`` / bare) or one of ``train_bk_sdm_compression.py``."""
    with lic_common.quiet_compressai():  # imported here, not at the top: --help answers before it loads
        from compressai.models import FactorizedPrior
        from compressai.zoo import bmshj2018_factorized
    if args.teacher_checkpoint:
        ckpt = lic_common.load_checkpoint(args.teacher_checkpoint)
        arch = ckpt.get("architecture", "bmshj2018-factorized")
        if arch != "bmshj2018-factorized":
            raise lic_common.CheckpointError(f"{args.teacher_checkpoint} is a '{arch}' checkpoint; the teacher is bmshj2018-factorized")
        state = next((ckpt[k] for k in ("state_dict", "network", "model_state_dict") if k in ckpt), ckpt)
        try:
            teacher = FactorizedPrior.from_state_dict(state)
        except (KeyError, RuntimeError) as e:
            raise lic_common.CheckpointError(f"{args.teacher_checkpoint} does not hold a bmshj2018-factorized model: {e}") from e
    else:
        try:
            teacher = bmshj2018_factorized(quality=args.quality, pretrained=True)
        except Exception as e:
            raise RuntimeError(
                f"could not download CompressAI's pretrained bmshj2018-factorized (quality {args.quality}): "
                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}; train one "
                "(train_bk_sdm_compression.py --model bmshj2018-factorized) and pass --teacher_checkpoint"
            ) from e
    teacher.update(force=True)
    return teacher.eval().requires_grad_(False)


# ---- Data ----


def split(files: list[Path], val_ratio: float, max_images: int = 0) -> tuple[list[Path], list[Path]]:
    files = files[:max_images] if max_images else files
    val = [f for f in files if lic_common.in_validation_split(f.name, val_ratio)]
    train = [f for f in files if f not in val]
    if not val and len(train) > 1:  # tiny folders: hold out at least the first image by hash order
        first = min(train, key=lambda f: lic_common.name_hash(f.name))
        train.remove(first)
        val = [first]
    return train, val


def fit_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` crop of ``x`` resized so that its shorter side is ``size`` (prepare's)."""
    return lic_common.scaled_crop(x, size, size / min(x.shape[-2:]))


class Crops(Dataset):
    """Training crops made on the fly (``random_crop``): ``length`` per epoch, each of a random
    image at a random position, downscaled by a random factor in ``downscale``, randomly flipped;
    or, for validation and prepared crops, each file's centred crop at ``downscale[1]``
    (prepared crops are already ``size``: they come out as they are). Files that cannot be
    decoded are skipped."""

    def __init__(self, files: list[Path], size: int, random_crop: bool, seed: int = 0,
                 downscale: tuple[float, float] = (1.0, 1.0), length: int = 0):  # fmt: skip
        self.files, self.size, self.random_crop, self.seed, self.epoch = files, size, random_crop, seed, 0
        self.downscale, self.length = downscale, length or len(files)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        for k in range(len(self.files)):
            try:
                x = lic_common.load_image(self.files[(i + k) % len(self.files)])
                break
            except lic_common.ImageError as e:
                print(f"warning: skipping {e}", file=sys.stderr)
        else:
            raise RuntimeError("no readable image in the data folder")
        if not self.random_crop:
            return lic_common.scaled_crop(x, self.size, self.downscale[1])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        x = lic_common.scaled_crop(x, self.size, lic_common.random_scale(g, *self.downscale), g)
        return x.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else x


def data_files(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    root = Path(args.coco_dir)
    if args.use_prepared:
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise FileNotFoundError(f"{root} has no train/ and val/ from 'prepare'; run prepare first or pass --use_prepared false")
        train, val = lic_common.list_images(root / "train"), lic_common.list_images(root / "val")
        return (train[: args.max_images] if args.max_images else train), val
    return split(lic_common.list_images(root), args.val_ratio, args.max_images)


def prepare(args: argparse.Namespace) -> dict:
    """Write ``crop_size`` crops (shorter side resized, centred) into out_dir/train and out_dir/val."""
    train, val = split(lic_common.list_images(args.coco_dir), args.val_ratio, args.max_images)
    out = Path(args.out_dir)
    for subset, files in (("train", train), ("val", val)):
        (out / subset).mkdir(parents=True, exist_ok=True)
        for f in tqdm(files, desc=subset, disable=not args.progress):
            try:
                x = fit_crop(lic_common.load_image(f), args.crop_size)
            except lic_common.ImageError as e:
                print(f"warning: skipping {e}", file=sys.stderr)
                continue
            lic_common.save_image(x, out / subset / f"{f.stem}.png")
    print(f"prepared {len(train)} training and {len(val)} validation crops in {out}")
    return {"train": len(train), "val": len(val)}


# ---- Training ----


def reconstruct(model: FactorizedPrior, x: torch.Tensor, train_encoder: bool = False) -> torch.Tensor:
    """x_hat from the quantized latent (rounded around the medians, as the coder does); with
    ``train_encoder`` the training-mode noisy latent, so gradients reach the encoder."""
    if train_encoder:
        y_hat, _ = model.entropy_bottleneck(model.g_a(x))
        return model.g_s(y_hat)
    with torch.no_grad():
        y = model.g_a(x)
        y_hat = model.entropy_bottleneck.quantize(y, "dequantize", model.entropy_bottleneck._get_medians())
    return model.g_s(y_hat)


def distortion_loss(x_hat: torch.Tensor, target: torch.Tensor, l1_weight: float, msssim_weight: float) -> tuple[torch.Tensor, dict]:
    l1 = F.l1_loss(x_hat, target)
    msssim = lic_common.ms_ssim(target.float(), x_hat.float())
    return l1_weight * l1 + msssim_weight * (1 - msssim), {"l1": l1.item(), "ms_ssim": msssim.item()}


STAGES = {
    "distill": {"save_dir": "./checkpoints", "recon_subdir": "recon", "epochs": 15, "last": "last.pt", "best": "best_msssim.pt"},
    "finetune": {"save_dir": "./checkpoints_ft", "recon_subdir": "recon_ft", "epochs": 10, "last": "ft_last.pt", "best": "ft_best.pt"},
}


class Stage:
    """One training stage (distill or finetune): models, data, optimizer, outputs."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.stage = args, args.command
        defaults = STAGES[self.stage]
        self.save_dir = Path(args.save_dir or defaults["save_dir"])
        self.recon_dir = self.save_dir / (args.recon_subdir or defaults["recon_subdir"])
        self.epochs = args.epochs or defaults["epochs"]
        self.names = defaults
        self.device = torch.device(args.device)
        lic_common.seed_everything(args.seed)
        self.teacher = load_teacher(args).to(self.device)
        self.student = self._initial_student().to(self.device)
        trainable = set_trainable(self.student, self.stage, args.train_igdn, args.unfreeze_all, args.freeze_igdn)
        if self.stage == "distill" and args.unfreeze_all:
            print("note: --unfreeze_all trains the student's encoder and entropy model too; "
                  "it will no longer decode the teacher's bitstreams")  # fmt: skip
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=args.lr)
        use_amp = args.amp and self.device.type in ("cuda", "cpu")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_amp else nullcontext
        if warning := lic_common.cpu_amp_warning(self.device, args.amp):
            print(f"warning: {warning}", file=sys.stderr)
        train_files, val_files = data_files(args)
        size = args.crop_size
        on_the_fly = not args.use_prepared
        downscale = (args.downscale_min, args.downscale_max) if on_the_fly else (1.0, 1.0)
        self.train_set = Crops(train_files, size, random_crop=on_the_fly, seed=args.seed, downscale=downscale,
                               length=args.crops_per_epoch if on_the_fly else 0)  # fmt: skip
        self.val_set = Crops(val_files, size, random_crop=False, downscale=downscale)
        self.recon_images = torch.stack([self.val_set[i] for i in range(min(args.recon_count, len(self.val_set)))])
        self.steps_per_epoch = max(1, len(self.train_set) // args.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.epoch, self.best = 0, -math.inf
        self.history_path = self.save_dir / f"{self.stage}_history.json"
        self.history = []  # one entry per epoch: training loss and validation metrics, for curves
        if args.resume:
            self._resume(self.save_dir / defaults["last"])
        self.writer = self._writer()
        self.wandb = lic_common.init_wandb(args.wandb_project, vars(args), f"{self.stage}-{self.save_dir.name}")
        print(f"{self.stage}: {sum(p.numel() for p in params) / 1e6:.3f} M trainable parameters in {len(trainable)} tensors; "
              f"{len(train_files)} training / {len(val_files)} validation images; epochs {self.epoch}..{self.epochs - 1}")  # fmt: skip

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``--warmup_steps``, then cosine annealing to 0 over all epochs.

        The warm-up matters here: Adam's first steps move every weight by about ``lr`` at once,
        and through the inverse GDNs the student's decoder is sharp around its initialisation
        (one unwarmed step at 1e-4 took a student from 26.6 to 13.0 dB against its teacher).
        """
        warm = min(1.0, (step + 1) / self.args.warmup_steps) if self.args.warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / (self.epochs * self.steps_per_epoch))))

    def _initial_student(self) -> FactorizedPrior:
        student = make_student(self.teacher)
        if self.stage == "finetune":
            path = Path(self.args.resume_student)
            load_student(student, path)
        return student

    def _resume(self, path: Path) -> None:
        ckpt = lic_common.load_checkpoint(path)
        if ckpt.get("kind") != "student" or ckpt.get("stage") != self.stage:
            raise lic_common.CheckpointError(f"{path} is not a {self.stage} checkpoint of this script")
        self.student.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.best = ckpt["epoch"] + 1, ckpt["best_msssim"]
        self.history = ckpt.get("history", [])
        lic_common.set_rng_state(ckpt["rng"])

    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        self.save_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / f"{self.stage}_config.json").write_text(json.dumps(vars(self.args), indent=2, default=str))
        return SummaryWriter(self.save_dir / "tensorboard" / self.stage)

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage == "finetune":
            return x
        with torch.no_grad():
            return reconstruct(self.teacher, x).clamp(0, 1)

    def save(self, name: str, epoch: int, metrics: dict) -> None:
        lic_common.save_checkpoint({
            "kind": "student", "stage": self.stage, "epoch": epoch, "best_msssim": self.best, "metrics": metrics,
            "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": lic_common.rng_state(), "config": vars(self.args),
            "history": self.history,
        }, self.save_dir / name)  # fmt: skip

    @torch.no_grad()
    def save_reconstructions(self, tag: str) -> None:
        """The student's reconstructions of the fixed validation subset: one PNG each, and a grid."""
        self.student.eval()
        x_hat = torch.cat([reconstruct(self.student, b.to(self.device)).clamp(0, 1).float().cpu() for b in self.recon_images.split(self.args.batch_size)])
        for i, img in enumerate(x_hat):
            lic_common.save_image(img, self.recon_dir / tag / f"{i:05d}.png")
        from torchvision.utils import make_grid

        self.writer.add_image(f"recon/{tag}", make_grid(x_hat, nrow=4), self.epoch)

    def train_one_epoch(self, epoch: int) -> dict:
        self.student.train()
        self.train_set.epoch = epoch
        g = torch.Generator().manual_seed(self.args.seed * 7919 + epoch)
        loader = DataLoader(self.train_set, batch_size=self.args.batch_size, shuffle=True, generator=g,
                            num_workers=self.args.num_workers, drop_last=len(self.train_set) > self.args.batch_size)  # fmt: skip
        totals, n = {"loss": 0.0, "l1": 0.0, "ms_ssim": 0.0}, 0
        for x in tqdm(loader, desc=f"{self.stage} epoch {epoch}", disable=not self.args.progress, leave=False):
            x = x.to(self.device)
            target = self.target(x)
            with self.autocast():
                x_hat = reconstruct(self.student, x, train_encoder=self.args.unfreeze_all and self.stage == "distill")
            loss, parts = distortion_loss(x_hat.float(), target, self.args.l1_weight, self.args.msssim_weight)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} in epoch {epoch}; the last good checkpoint is {self.save_dir / self.names['last']}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] += v
            n += 1
        return {k: v / max(n, 1) for k, v in totals.items()}

    @torch.no_grad()
    def validate(self) -> dict:
        """Student against the stage's target, and against the originals (PSNR, MS-SSIM)."""
        self.student.eval()
        rows = []
        for i in range(len(self.val_set)):
            x = self.val_set[i][None].to(self.device)
            x_hat = reconstruct(self.student, x).clamp(0, 1)
            target = self.target(x)
            rows.append((lic_common.psnr(target, x_hat), lic_common.ms_ssim(target, x_hat).item(), lic_common.psnr(x, x_hat)))
        psnr, msssim, psnr_orig = (sum(c) / len(rows) for c in zip(*rows))
        return {"val/psnr": psnr, "val/ms_ssim": msssim, "val/psnr_vs_original": psnr_orig}

    def fit(self) -> dict:
        if self.epoch == 0:
            self.save_reconstructions("pre_e000")
        metrics = {}
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            t0 = time.perf_counter()
            train = self.train_one_epoch(epoch)
            metrics = self.validate()
            self.log({f"train/{k}": v for k, v in train.items()} | metrics | {"lr": self.optimizer.param_groups[0]["lr"]}, epoch)
            self.history.append({"epoch": epoch, "step": (epoch + 1) * self.steps_per_epoch, "train_loss": train["loss"], **metrics})
            lic_common.write_text_atomic(self.history_path, json.dumps(self.history, indent=1))
            improved = metrics["val/ms_ssim"] > self.best
            self.best = max(self.best, metrics["val/ms_ssim"])
            print(f"{self.stage} epoch {epoch}: loss {train['loss']:.4f} | val PSNR {metrics['val/psnr']:.2f} dB "
                  f"MS-SSIM {metrics['val/ms_ssim']:.4f}{' (best)' if improved else ''}  {time.perf_counter() - t0:.1f} s")  # fmt: skip
            if (epoch + 1) % self.args.recon_every == 0:
                self.save_reconstructions(f"e{epoch:03d}")
            if improved:
                self.save(self.names["best"], epoch, metrics)
            self.save(self.names["last"], epoch, metrics)
        self.writer.close()
        if self.wandb:
            self.wandb.finish()
        return metrics | {"best_msssim": self.best}


# ---- Evaluation ----


def checkerboard_energy(x: torch.Tensor, x_hat: torch.Tensor, period: int = 16) -> float:
    """Checkerboard artifacts as a number: in the power spectrum of the reconstruction error, the
    mean ratio (in dB) of the power at the frequencies of the decoder's upsampling grid
    (multiples of 1/``period`` cycles per pixel in each axis, DC excluded) to the mean power of
    their eight neighbours. A smooth error spectrum gives about 0 dB; periodic artifacts from
    stride-2 layers stand out as peaks at exactly those frequencies. Part of it is common to
    every decoder of the same latent (the quantization error lives on the same 16-pixel grid),
    so it separates decoders by their differences above that shared floor."""
    h, w = (s // period * period for s in x.shape[-2:])
    err = (x_hat - x)[..., :h, :w].float().mean(-3)  # luminance-like average of the channels
    power = torch.fft.fft2(err).abs().pow(2)
    if power.dim() > 2:
        power = power.flatten(0, -3).mean(0)
    ratios = []
    for a in range(period):
        for b in range(period):
            if a == b == 0:
                continue
            fy, fx = a * h // period, b * w // period
            neighbours = [power[(fy + dy) % h, (fx + dx) % w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
            ratios.append((power[fy, fx] / (torch.stack(neighbours).mean() + 1e-20)).item())
    return 10 * math.log10(sum(ratios) / len(ratios))


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict:
    """Teacher and student on every image: quality against the originals (and student against
    teacher), bpp of the teacher's real bitstream, which the student decodes, and the
    checkerboard energy of both."""
    device = torch.device(args.device)
    teacher = load_teacher(args).to(device)
    student = make_student(teacher)
    if args.checkpoint:
        load_student(student, args.checkpoint)
    student = student.to(device).eval()
    student.update(force=True)
    same_coder = all(torch.equal(a, b) for a, b in zip(teacher.entropy_bottleneck.state_dict().values(), student.entropy_bottleneck.state_dict().values()))
    files = lic_common.list_images(args.data_path or args.coco_dir)[: args.max_images or None]
    rows = []
    for f in files:
        x = lic_common.load_image(f)[None].to(device)
        h, w = x.shape[-2:]
        xp = F.pad(x, (0, (-w) % 16, 0, (-h) % 16))
        enc = teacher.compress(xp)
        bpp = 8 * sum(len(s[0]) for s in enc["strings"]) / (h * w)
        t_hat = teacher.decompress(enc["strings"], enc["shape"])["x_hat"][..., :h, :w]
        if same_coder:  # the student decodes the teacher's bitstream
            s_hat = student.decompress(enc["strings"], enc["shape"])["x_hat"][..., :h, :w]
        else:
            s_enc = student.compress(xp)
            s_hat = student.decompress(s_enc["strings"], s_enc["shape"])["x_hat"][..., :h, :w]
        rows.append({
            "image": f.name, "bpp": bpp,
            "teacher_psnr": lic_common.psnr(x, t_hat), "student_psnr": lic_common.psnr(x, s_hat),
            "teacher_ms_ssim": lic_common.ms_ssim(x, t_hat).item(), "student_ms_ssim": lic_common.ms_ssim(x, s_hat).item(),
            "student_vs_teacher_psnr": lic_common.psnr(t_hat, s_hat),
            "teacher_checkerboard_db": checkerboard_energy(x, t_hat), "student_checkerboard_db": checkerboard_energy(x, s_hat),
        })  # fmt: skip
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "image"}
    mean["psnr_gap_db"] = mean["teacher_psnr"] - mean["student_psnr"]
    mean["student_decodes_teacher_bitstreams"] = same_coder
    print(f"{len(rows)} images from {args.data_path or args.coco_dir}; bpp {mean['bpp']:.4f} (teacher's bitstream"
          f"{', decoded by the student' if same_coder else '; the student has its own encoder'})")  # fmt: skip
    print(f"{'':>10}{'PSNR dB':>10}{'MS-SSIM':>10}{'checkerboard dB':>17}")
    for who in ("teacher", "student"):
        print(f"{who:>10}{mean[f'{who}_psnr']:>10.2f}{mean[f'{who}_ms_ssim']:>10.4f}{mean[f'{who}_checkerboard_db']:>17.2f}")
    print(f"student vs teacher: PSNR {mean['student_vs_teacher_psnr']:.2f} dB; gap to the teacher {mean['psnr_gap_db']:.3f} dB")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"mean": mean, "per_image": rows}, indent=2))
    return mean


# ---- Command line ----


def parse_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data_required=True):
        p.add_argument("--coco_dir", required=data_required, default=None, help="image folder (COCO train2017 in the original recipe), or the output of prepare")
        p.add_argument("--val_ratio", type=float, default=0.02, help="share of images held out for validation, by a hash of the file name")
        p.add_argument("--max_images", type=int, default=0, help="use at most this many images (0: all)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")

    def teacher(p):
        p.add_argument("--quality", type=int, default=8, choices=range(1, 9), help="quality of CompressAI's pretrained teacher")
        p.add_argument("--teacher_checkpoint", default=None, help="local bmshj2018-factorized checkpoint instead of the download")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")

    p = sub.add_parser("prepare", help="write 224x224 crops split into train/ and val/", formatter_class=fmt)
    common(p)
    p.add_argument("--out_dir", required=True, help="where train/ and val/ are written")
    p.add_argument("--crop_size", type=int, default=224, help="crop side in pixels")

    for name in ("distill", "finetune"):
        d = STAGES[name]
        p = sub.add_parser(name, help=f"the {name} stage", formatter_class=fmt)
        common(p)
        teacher(p)
        p.add_argument("--use_prepared", type=parse_bool, nargs="?", const=True, default=True, help="read prepare's crops (false: crop on the fly)")
        p.add_argument("--crop_size", type=int, default=224, help="training crop side")
        p.add_argument("--downscale_min", type=float, default=0.5, help="crops on the fly come from the image downscaled by a random factor in [downscale_min, downscale_max]; validation crops are centred at downscale_max")
        p.add_argument("--downscale_max", type=float, default=1.0, help="see --downscale_min")
        p.add_argument("--crops_per_epoch", type=int, default=0, help="crops on the fly per epoch, each of a random image (0: one per image)")
        p.add_argument("--save_dir", default=None, help=f"checkpoints and reconstructions (default {d['save_dir']})")
        p.add_argument("--recon_subdir", default=None, help=f"reconstructions go to save_dir/<this>/<tag>/ (default {d['recon_subdir']})")
        p.add_argument("--recon_every", type=int, default=5, help="save reconstructions every this many epochs")
        p.add_argument("--recon_count", type=int, default=16, help="validation images reconstructed (the first of the split)")
        p.add_argument("--epochs", type=int, default=None, help=f"epochs (default {d['epochs']})")
        p.add_argument("--batch_size", type=int, default=16, help="batch size")
        p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (cosine annealing over the epochs)")
        p.add_argument("--warmup_steps", type=int, default=100, help="linear learning-rate warm-up (steps) before the cosine")
        p.add_argument("--l1_weight", type=float, default=1.0, help="weight of L1 in the loss")
        p.add_argument("--msssim_weight", type=float, default=0.2, help="weight of 1 - MS-SSIM in the loss")
        p.add_argument("--num_workers", type=int, default=2, help="data-loading workers")
        p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast of the student's training forward (CUDA and CPU); targets, validation and eval stay fp32")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue this stage from its last checkpoint in save_dir")
        p.add_argument("--wandb_project", default=None, help="also log to Weights & Biases (if installed; off with WANDB_DISABLED=true)")
        p.add_argument("--train_igdn", action=argparse.BooleanOptionalAction, default=False, help="distill: train the inverse GDN layers too")
        p.add_argument("--unfreeze_all", action=argparse.BooleanOptionalAction, default=False, help="distill: train every layer (the student stops decoding teacher bitstreams)")
        p.add_argument("--freeze_igdn", action=argparse.BooleanOptionalAction, default=False, help="finetune: keep the inverse GDN layers fixed")
        p.add_argument("--resume_student", default="./checkpoints/best_msssim.pt", help="finetune: the distillation checkpoint to start from")

    p = sub.add_parser("eval", help="teacher vs student: quality, bpp, checkerboard energy", formatter_class=fmt)
    common(p, data_required=False)
    teacher(p)
    p.add_argument("--data_path", default=None, help="any image folder to evaluate on (e.g. Kodak), instead of --coco_dir")
    p.add_argument("--checkpoint", default=None, help="student checkpoint (default: the student as initialised, before training)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.data_path or args.coco_dir):
        parser.error("eval needs --data_path or --coco_dir")
    if args.command in STAGES and not 0 < args.downscale_min <= args.downscale_max <= 1:
        parser.error(f"need 0 < --downscale_min <= --downscale_max <= 1, got {args.downscale_min} and {args.downscale_max}")
    if args.command in STAGES:
        for name in ("batch_size", "crop_size", "recon_every", "recon_count"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if (args.epochs is not None and args.epochs < 1) or args.lr <= 0 or min(args.num_workers, args.warmup_steps, args.crops_per_epoch) < 0:
            parser.error("need --epochs >= 1, --lr > 0, and --num_workers, --warmup_steps, --crops_per_epoch >= 0")
        if args.resume:
            return resumed_args(parser, args, argv)
    return args


# What a resumed stage may change: how long and how it runs; the rest is the run's.
RESUME_MAY_CHANGE = frozenset({"epochs", "num_workers", "device", "progress", "recon_every", "wandb_project"})


def resumed_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """``--resume``: the settings of the stage's last checkpoint in its save_dir, an explicit flag
    overriding what may change (with a printed line) and refused for the rest."""
    path = Path(args.save_dir or STAGES[args.command]["save_dir"]) / STAGES[args.command]["last"]
    return lic_common.resumed_settings(parser, args, argv, path, ("config",), RESUME_MAY_CHANGE,
                                       own=("resume", "save_dir", "command"))  # fmt: skip


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            return prepare(args)
        if args.command == "eval":
            return evaluate(args)
        return Stage(args).fit()
    except (lic_common.CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

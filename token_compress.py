"""Vision token compression: fewer CLIP tokens per image for vision-language models.

LLaVA-style models feed the 576 tokens of a frozen CLIP ViT-L/14-336 (a 24x24 grid of
1024-dimensional tokens from the penultimate layer, class token dropped) to the language model.
This compresses the grid with progressive strided 2D convolutions (to 6x6 by default: 16x fewer
tokens), trains the compressed tokens adversarially to be indistinguishable from original ones
(WGAN-GP, Gulrajani et al. 2017: a critic, its gradient penalty, n_critic critic updates per
generator update), and reconstructs the original grid from them with an autoencoder decoder,
so each compressed token keeps the information of its receptive field.

    image (B, 3, 336, 336) -> CLIP (frozen) -> tokens (B, 1024, 24, 24)
      -> compressor -> compressed (B, 1024, g, g), g in {4, 6, 8, 12}
      -> decoder    -> reconstruction (B, 1024, 24, 24)
    critic: token grid (B, 1024, g, g) -> score (B,); real samples are g x g crops of the original grid

Generator loss: wgan_weight * -critic(compressed) + ae_weight * (reconstruction + spatial
consistency), the spatial term over each compressed token's receptive field (an r x r block of
original tokens, r = 24 / g). Critic loss: critic(compressed) - critic(real) + lambda_gp * GP.

    python token_compress.py train --data_dir imagenet/train --output_dir runs/tc --cache_tokens cache/
    python token_compress.py eval --checkpoint runs/tc/best_model.pt --data_dir imagenet/val
    python token_compress.py infer --checkpoint runs/tc/best_model.pt --image cat.jpg
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import lic_common

# ---- CLIP tokens ----


def load_clip(name_or_path: str, device: torch.device):
    """The frozen CLIP vision tower and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    def load(**kwargs):
        return CLIPVisionModel.from_pretrained(name_or_path, **kwargs), CLIPImageProcessor.from_pretrained(name_or_path, **kwargs)

    try:
        if Path(name_or_path).is_dir():
            model, processor = load()
        else:  # the local cache first; offline, an uncached hub id fails at once
            try:
                model, processor = load(local_files_only=True)
            except Exception:
                if not lic_common.hub_reachable():
                    raise OSError("it is not in the local Hugging Face cache and the hub is not reachable from here") from None
                model, processor = load()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RuntimeError(f"could not load CLIP from '{name_or_path}' ({first}); pass --clip_model a local folder "
                           "holding the model and its preprocessor_config.json") from e
    return model.to(device).eval().requires_grad_(False), processor


def clip_grid_size(clip) -> int:
    config = clip.config
    if config.image_size % config.patch_size:
        raise ValueError(f"CLIP image size {config.image_size} is not a multiple of its patch size {config.patch_size}")
    return config.image_size // config.patch_size


@torch.no_grad()
def clip_tokens(clip, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, D, g, g): hidden state ``layer`` (-2: the penultimate, as LLaVA), no class token."""
    hidden = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
    tokens = hidden[:, 1:]  # drop the class token
    g = clip_grid_size(clip)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g).float()


# ---- Building blocks ----


def stride_plan(input_grid: int, output_grid: int, num_layers: int) -> list[int]:
    """Strides (2s first, then 3s, padded with 1s to ``num_layers``) that take input_grid to
    output_grid; ``ValueError`` when the layers cannot reach it."""
    if output_grid > input_grid or input_grid % output_grid:
        raise ValueError(f"--output_grid_size {output_grid} does not divide the {input_grid}x{input_grid} token grid")
    factor, strides = input_grid // output_grid, []
    for p in (2, 3):
        while factor % p == 0:
            strides.append(p)
            factor //= p
    if factor != 1 or len(strides) > num_layers:
        raise ValueError(
            f"--output_grid_size {output_grid} cannot be reached from {input_grid}x{input_grid} with {num_layers} "
            f"layers of stride 2 or 3 (reduction {input_grid // output_grid})"
        )
    return strides + [1] * (num_layers - len(strides))


class DownBlock(nn.Module):
    """Conv (kernel stride + 2, stride s) + GELU + 1x1 conv; residual: average pooling by s."""

    def __init__(self, dim: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, stride + 2, stride=stride, padding=1), nn.GELU(), nn.Conv2d(hidden, dim, 1)
        )
        self.stride, self.residual = stride, residual

    def forward(self, x):
        out = self.body(x)
        return out + F.avg_pool2d(x, self.stride) if self.residual else out


class UpBlock(nn.Module):
    """Nearest upsampling by s, 3x3 conv + GELU + 1x1 conv; residual: the upsampled input."""

    def __init__(self, dim: int, hidden: int, scale: int, residual: bool):
        super().__init__()
        self.scale, self.residual = scale, residual
        self.body = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x):
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        out = self.body(x)
        return out + x if self.residual else out


class Compressor(nn.Module):
    """(B, D, G, G) -> (B, D, g, g) through ``num_layers`` progressive strided convolutions."""

    def __init__(self, dim: int, input_grid: int, output_grid: int, num_layers: int, hidden: int, residual: bool):
        super().__init__()
        self.strides = stride_plan(input_grid, output_grid, num_layers)
        self.blocks = nn.Sequential(*[DownBlock(dim, hidden, s, residual) for s in self.strides])

    def forward(self, x):
        return self.blocks(x)


class ConvDecoder(nn.Module):
    """(B, D, g, g) -> (B, D, G, G): the compressor's strides in reverse, as upsampling."""

    def __init__(self, dim: int, strides: list[int], hidden: int, residual: bool):
        super().__init__()
        self.blocks = nn.Sequential(*[UpBlock(dim, hidden, s, residual) for s in reversed(strides)])

    def forward(self, x):
        return self.blocks(x)


class AttentionDecoder(nn.Module):
    """(B, D, g, g) -> (B, D, G, G): G*G learned queries (plus positions) cross-attend to the
    compressed tokens (plus positions) through a small transformer decoder."""

    def __init__(self, dim: int, input_grid: int, output_grid: int, heads: int, layers: int):
        super().__init__()
        self.G, self.g = input_grid, output_grid
        self.queries = nn.Parameter(torch.randn(1, input_grid * input_grid, dim) * 0.02)
        self.memory_pos = nn.Parameter(torch.randn(1, output_grid * output_grid, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, x):
        B, D = x.shape[:2]
        memory = x.flatten(2).transpose(1, 2) + self.memory_pos
        # each query starts from the compressed token covering its position
        start = F.interpolate(x, size=(self.G, self.G), mode="nearest").flatten(2).transpose(1, 2)
        out = self.decoder(start + self.queries, memory)
        return out.transpose(1, 2).reshape(B, D, self.G, self.G)


class Critic(nn.Module):
    """WGAN critic on a token grid (B, D, h, w) -> (B,). A per-token MLP (1x1 convolutions, no
    normalisation, as WGAN-GP requires), averaged over tokens; the multi-scale variant adds 3x3
    convolutions over the grid at 1x and 1/2 resolution, so token neighbourhoods are judged too."""

    def __init__(self, dim: int, hidden: int, multiscale: bool):
        super().__init__()
        self.token = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))
        self.multiscale = multiscale
        if multiscale:
            self.local = nn.ModuleList(
                nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1)) for _ in range(2)
            )

    def forward(self, x):
        score = self.token(x).mean((1, 2, 3))
        if self.multiscale:
            score = score + self.local[0](x).mean((1, 2, 3))
            if min(x.shape[-2:]) >= 2:
                score = score + self.local[1](F.avg_pool2d(x, 2)).mean((1, 2, 3))
        return score


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[(||grad critic(interpolate)|| - 1)^2], per sample over all its tokens, in fp32."""
    with torch.autocast(device_type=real.device.type, enabled=False):
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        mix = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def random_crops(tokens: torch.Tensor, g: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random g x g crop of each original grid: real samples shaped like the compressed ones."""
    G = tokens.shape[-1]
    idx = torch.randint(0, G - g + 1, (tokens.shape[0], 2), generator=generator)
    return torch.stack([t[:, i : i + g, j : j + g] for t, (i, j) in zip(tokens, idx.tolist())])


class TokenCompressor(nn.Module):
    """Compressor + decoder (the generator); the critic is kept apart for its own optimizer."""

    def __init__(self, dim: int, input_grid: int, args_or_config):
        super().__init__()
        c = args_or_config if isinstance(args_or_config, dict) else model_config(args_or_config, dim, input_grid)
        self.config = c
        self.compressor = Compressor(dim, input_grid, c["output_grid_size"], c["num_layers"], c["hidden_dim"] or dim, c["use_residual"])
        if c["use_attention"]:
            self.decoder = AttentionDecoder(dim, input_grid, c["output_grid_size"], c["attention_heads"], c["num_layers"])
        else:
            self.decoder = ConvDecoder(dim, self.compressor.strides, c["hidden_dim"] or dim, c["use_residual"])

    def forward(self, tokens):
        compressed = self.compressor(tokens)
        return compressed, self.decoder(compressed)


def model_config(args: argparse.Namespace, dim: int, input_grid: int) -> dict:
    return {
        "clip_model": args.clip_model, "select_layer": args.select_layer, "token_dim": dim, "input_grid": input_grid,
        "output_grid_size": args.output_grid_size, "num_layers": args.num_layers, "hidden_dim": args.hidden_dim,
        "use_residual": args.use_residual, "use_attention": args.use_attention, "attention_heads": args.attention_heads,
        "multiscale_critic": args.multiscale_critic, "critic_hidden": args.critic_hidden,
    }  # fmt: skip


# ---- Losses and metrics ----


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    mse = F.mse_loss(recon, target)
    cos = 1 - F.cosine_similarity(recon, target, dim=1).mean()
    return {"mse": mse, "cosine": cos, "hybrid": mse + cos}[kind]


def spatial_consistency_loss(compressed: torch.Tensor, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Over each compressed token's receptive field (an r x r block of original tokens): the
    reconstruction's block mean matches the original's, and the compressed token points where
    the block's mean token does."""
    r = target.shape[-1] // compressed.shape[-1]
    target_blocks = F.avg_pool2d(target, r)
    blocks = F.mse_loss(F.avg_pool2d(recon, r), target_blocks)
    direction = 1 - F.cosine_similarity(compressed, target_blocks, dim=1).mean()
    return blocks + direction


@torch.no_grad()
def reconstruction_metrics(recon: torch.Tensor, target: torch.Tensor, mean_token: torch.Tensor) -> dict:
    """MSE, token cosine (mean and spread over tokens), and the cosine after subtracting the mean
    token, which a shared direction (CLIP tokens have a large one) cannot inflate."""
    cos = F.cosine_similarity(recon, target, dim=1).flatten()
    centred = F.cosine_similarity(recon - mean_token, target - mean_token, dim=1).flatten()
    return {"mse": F.mse_loss(recon, target).item(), "cosine": cos.mean().item(), "cosine_std": cos.std().item(),
            "cosine_centred": centred.mean().item()}  # fmt: skip


def baselines(target: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """Parameter-free reconstructions at the same token count: average pooling to g x g, then
    nearest or bilinear upsampling back."""
    pooled = F.adaptive_avg_pool2d(target, g)
    size = target.shape[-2:]
    return {
        "avgpool+nearest": F.interpolate(pooled, size=size, mode="nearest"),
        "avgpool+bilinear": F.interpolate(pooled, size=size, mode="bilinear", align_corners=False),
    }


# ---- Data ----


class ImageTokens(Dataset):
    """Images of a folder (ImageNet-style, searched recursively) as CLIP pixel values, or as
    cached CLIP tokens when ``cache`` is set and holds them."""

    def __init__(self, files: list[Path], processor, cache: Path | None, cache_key: str):
        self.files, self.processor, self.cache, self.cache_key = files, processor, cache, cache_key

    def __len__(self):
        return len(self.files)

    def cache_path(self, i: int) -> Path | None:
        if self.cache is None:
            return None
        digest = hashlib.sha1(f"{self.cache_key}|{self.files[i].resolve()}".encode()).hexdigest()
        return self.cache / digest[:2] / f"{digest}.pt"

    def __getitem__(self, i):
        path = self.cache_path(i)
        if path is not None and path.is_file():
            return {"tokens": torch.load(path, weights_only=True).float(), "index": i}
        try:
            with Image.open(self.files[i]) as img:
                pixels = self.processor(images=[img.convert("RGB")], return_tensors="pt").pixel_values[0]
        except OSError as e:
            raise lic_common.ImageError(f"cannot decode image {self.files[i]}: {e}") from e
        return {"pixels": pixels, "index": i}


def collate(items: list[dict]) -> dict:
    out = {"index": torch.tensor([it["index"] for it in items])}
    for key in ("tokens", "pixels"):
        have = [it[key] for it in items if key in it]
        if have:
            out[key] = torch.stack(have)
            out[f"{key}_index"] = torch.tensor([it["index"] for it in items if key in it])
    return out


def image_files(args) -> tuple[list[Path], list[Path]]:
    files = lic_common.list_images(args.data_dir)
    if args.subset_size:
        files = sorted(files, key=lambda p: lic_common.name_hash(p.name))[: args.subset_size]
        files.sort()
    if getattr(args, "val_dir", None):
        return files, lic_common.list_images(args.val_dir)
    val = [f for f in files if lic_common.in_validation_split(f.name, args.val_fraction)]
    if not val:
        val = files[:1]
    return [f for f in files if f not in val] or files, val


# ---- Training ----


class Run:
    """CLIP, the models, their optimizers and data for ``train`` and ``eval``."""

    def __init__(self, args: argparse.Namespace, train: bool):
        self.args = args
        self.rank, self.world = lic_common.setup_distributed(args.device)
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        lic_common.seed_everything(args.seed + self.rank)
        ckpt = self._checkpoint(train)
        if ckpt is not None:
            self._check_matches(ckpt["config"])
        self.clip, self.processor = load_clip(args.clip_model, self.device)
        self.grid = clip_grid_size(self.clip)
        dim = self.clip.config.hidden_size
        self.model = TokenCompressor(dim, self.grid, ckpt["config"] if ckpt else args).to(self.device)
        c = self.model.config
        self.critic = Critic(dim, c["critic_hidden"], c["multiscale_critic"]).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=args.lr, betas=(0.5, 0.9))
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=args.lr, betas=(0.5, 0.9))
        self.use_amp = self.device.type == "cuda" and args.amp
        self.epoch, self.step, self.best = 0, 0, math.inf
        self.mean_token = torch.zeros(1, dim, 1, 1, device=self.device)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.critic.load_state_dict(ckpt["critic"])
            self.mean_token = ckpt["mean_token"].to(self.device)
            if train and args.resume:
                self.opt_g.load_state_dict(ckpt["opt_g"])
                self.opt_c.load_state_dict(ckpt["opt_c"])
                self.epoch, self.step, self.best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
        self.cache = Path(args.cache_tokens) if getattr(args, "cache_tokens", None) else None
        self.cache_key = f"{args.clip_model}|{args.select_layer}|{self.grid}"

    def _checkpoint(self, train: bool) -> dict | None:
        path = (Path(self.args.output_dir) / "last_model.pt") if train and self.args.resume else getattr(self.args, "checkpoint", None)
        if not path:
            return None
        ckpt = lic_common.load_checkpoint(path)
        if ckpt.get("kind") != "token_compressor":
            raise lic_common.CheckpointError(f"{path} is not a token_compress.py checkpoint")
        return ckpt

    def _check_matches(self, config: dict) -> None:
        for flag in ("clip_model", "select_layer", "output_grid_size"):
            given = getattr(self.args, flag)
            if given is not None and given != config[flag]:
                raise lic_common.CheckpointError(f"the checkpoint was trained with --{flag} {config[flag]}, not {given}")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else nullcontext()

    def tokens(self, batch: dict, dataset: ImageTokens) -> torch.Tensor:
        """The batch's CLIP tokens, from the cache or from CLIP (then written to the cache)."""
        parts, order = [], []
        if "tokens" in batch:
            parts.append(batch["tokens"].to(self.device))
            order.append(batch["tokens_index"])
        if "pixels" in batch:
            with self.autocast():
                fresh = clip_tokens(self.clip, batch["pixels"].to(self.device), self.model.config["select_layer"])
            parts.append(fresh)
            order.append(batch["pixels_index"])
            if self.cache is not None:
                for i, t in zip(batch["pixels_index"].tolist(), fresh):
                    path = dataset.cache_path(i)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    torch.save(t.half().cpu().clone(), tmp)
                    os.replace(tmp, path)
        by_index = {i: t for part, idx in zip(parts, order) for i, t in zip(idx.tolist(), part)}
        return torch.stack([by_index[i] for i in batch["index"].tolist()])

    def loader(self, files: list[Path], shuffle: bool) -> DataLoader:
        ds = ImageTokens(files, self.processor, self.cache, self.cache_key)
        sampler = DistributedSampler(ds, self.world, self.rank, shuffle=shuffle, seed=self.args.seed) if self.world > 1 else None
        g = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(ds, batch_size=self.args.batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=g,
                          num_workers=self.args.num_workers, collate_fn=collate, persistent_workers=self.args.num_workers > 0)  # fmt: skip

    def generator_step(self, tokens: torch.Tensor, model) -> dict:
        a = self.args
        with self.autocast():
            compressed, recon = model(tokens)
            adv = -self.critic(compressed).mean()
        recon, compressed = recon.float(), compressed.float()
        rec = reconstruction_loss(recon, tokens, a.recon_loss)
        spatial = spatial_consistency_loss(compressed, recon, tokens)
        loss = a.wgan_weight * adv.float() + a.ae_weight * (rec + a.spatial_weight * spatial)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return {"g_loss": loss.item(), "adv": adv.item(), "recon": rec.item(), "spatial": spatial.item()}

    def critic_step(self, tokens: torch.Tensor, model) -> dict:
        with torch.no_grad(), self.autocast():
            compressed, _ = model(tokens)
        real = random_crops(tokens, compressed.shape[-1]).to(self.device)
        with self.autocast():
            w = self.critic(real).mean() - self.critic(compressed.float()).mean()
        gp = gradient_penalty(self.critic, real, compressed)
        loss = -w.float() + self.args.lambda_gp * gp
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:  # the critic is not DDP-wrapped: DDP cannot do the penalty's double backward
            for p in self.critic.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.world
        self.opt_c.step()
        return {"c_loss": loss.item(), "wasserstein": w.item(), "gp": gp.item()}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict:
        """Reconstruction figures of the model and of the parameter-free baselines, the critic's
        Wasserstein estimate and gradient penalty, over a loader."""
        self.model.eval()
        sums: dict[str, float] = {}
        n = 0
        g = self.model.config["output_grid_size"]
        for batch in loader:
            tokens = self.tokens(batch, loader.dataset)
            with self.autocast():
                compressed, recon = self.model(tokens)
            rows = {"model": reconstruction_metrics(recon.float(), tokens, self.mean_token)}
            for name, rec in baselines(tokens, g).items():
                rows[name] = reconstruction_metrics(rec, tokens, self.mean_token)
            real = random_crops(tokens, g)
            rows["critic"] = {"wasserstein": (self.critic(real).mean() - self.critic(compressed.float()).mean()).item()}
            with torch.enable_grad():
                rows["critic"]["gp"] = gradient_penalty(self.critic, real, compressed).item()
            b = tokens.shape[0]
            for who, metrics in rows.items():
                for k, v in metrics.items():
                    sums[f"{who}/{k}"] = sums.get(f"{who}/{k}", 0.0) + v * b
            n += b
        totals = torch.tensor([sums[k] for k in sorted(sums)] + [n], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        return {k: (totals[i] / totals[-1]).item() for i, k in enumerate(sorted(sums))}

    def estimate_mean_token(self, loader: DataLoader, batches: int) -> None:
        """The dataset's mean token (for the mean-centred cosine), from the first batches."""
        total, n = 0, 0
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            t = self.tokens(batch, loader.dataset)
            total, n = total + t.sum((0, 2, 3)), n + t.shape[0] * t.shape[2] * t.shape[3]
        self.mean_token = (total / n).view(1, -1, 1, 1)

    def save(self, name: str, metrics: dict) -> None:
        if self.rank:
            return
        lic_common.save_checkpoint({
            "kind": "token_compressor", "config": self.model.config, "model": self.model.state_dict(),
            "critic": self.critic.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_c": self.opt_c.state_dict(),
            "epoch": self.epoch, "step": self.step, "best": self.best, "metrics": metrics,
            "mean_token": self.mean_token.cpu(), "args": vars(self.args),
        }, Path(self.args.output_dir) / name)  # fmt: skip

    def fit(self) -> dict:
        a = self.args
        out = Path(a.output_dir)
        train_files, val_files = image_files(a)
        train_loader, val_loader = self.loader(train_files, True), self.loader(val_files, False)
        writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({"args": vars(a), "model": self.model.config}, indent=2, default=str))
            writer = SummaryWriter(out / "tensorboard")
        wandb_run = lic_common.init_wandb(a.wandb_project, vars(a)) if self.rank == 0 else None
        if self.epoch == 0:
            self.estimate_mean_token(train_loader, a.mean_token_batches)
        model = DistributedDataParallel(self.model) if self.world > 1 else self.model
        if self.rank == 0:
            print(f"train: {len(train_files)} / val: {len(val_files)} images, grid {self.grid} -> {self.model.config['output_grid_size']}, "
                  f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M generator parameters")  # fmt: skip
        metrics = {}
        for epoch in range(self.epoch, a.epochs):
            self.epoch = epoch
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)
            self.model.train()
            t0 = time.perf_counter()
            for i, batch in enumerate(tqdm(train_loader, desc=f"epoch {epoch}", disable=not a.progress or self.rank > 0, leave=False)):
                tokens = self.tokens(batch, train_loader.dataset)
                logs = self.critic_step(tokens, model)
                if (i + 1) % a.n_critic == 0:
                    logs |= self.generator_step(tokens, model)
                    for k, v in logs.items():
                        if not math.isfinite(v):
                            raise RuntimeError(f"{k} is {v} at step {self.step}; the last good checkpoint is {out / 'last_model.pt'}")
                    if writer:
                        for k, v in logs.items():
                            writer.add_scalar(f"train/{k}", v, self.step)
                    if wandb_run:
                        wandb_run.log(logs, step=self.step)
                self.step += 1
            metrics = self.evaluate(val_loader)
            improved = metrics["model/mse"] < self.best
            self.best = min(self.best, metrics["model/mse"])
            if writer:
                for k, v in metrics.items():
                    writer.add_scalar(f"val/{k}", v, self.step)
            if self.rank == 0:
                print(f"epoch {epoch} ({time.perf_counter() - t0:.1f} s): " + format_metrics(metrics) + (" (best)" if improved else ""))
            if improved:
                self.save("best_model.pt", metrics)
            self.save("last_model.pt", metrics)
        if writer:
            writer.close()
        return metrics | {"epoch": self.epoch, "step": self.step}


def format_metrics(m: dict) -> str:
    rows = [f"{who}: mse {m[f'{who}/mse']:.4f} cos {m[f'{who}/cosine']:.4f}±{m[f'{who}/cosine_std']:.3f} centred {m[f'{who}/cosine_centred']:.4f}"
            for who in ("model", "avgpool+nearest", "avgpool+bilinear")]  # fmt: skip
    return " | ".join(rows) + f" | W {m['critic/wasserstein']:.4f} GP {m['critic/gp']:.4f}"


# ---- Inference ----


def pca_colours(grid: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(D, h, w) -> (3, h, w): projection on three principal components, scaled to [0, 1]."""
    flat = grid.flatten(1).T - mean
    proj = (flat @ basis).T.reshape(3, *grid.shape[-2:])
    return ((proj - lo.view(3, 1, 1)) / (hi - lo).clamp_min(1e-8).view(3, 1, 1)).clamp(0, 1)


@torch.no_grad()
def infer(args: argparse.Namespace) -> dict:
    run = Run(args, train=False)
    with Image.open(args.image) as img:
        pixels = run.processor(images=[img.convert("RGB")], return_tensors="pt").pixel_values.to(run.device)
    tokens = clip_tokens(run.clip, pixels, run.model.config["select_layer"])
    run.model.eval()
    compressed, recon = run.model(tokens)
    g = compressed.shape[-1]
    report = {"model": reconstruction_metrics(recon, tokens, run.mean_token)}
    report |= {k: reconstruction_metrics(v, tokens, run.mean_token) for k, v in baselines(tokens, g).items()}
    print(f"{args.image}: tokens {tuple(tokens.shape[1:])} -> compressed {tuple(compressed.shape[1:])} "
          f"({tokens.shape[-1] ** 2} -> {g * g} tokens)")  # fmt: skip
    for who, m in report.items():
        print(f"{who:>18}: MSE {m['mse']:.5f}  cosine {m['cosine']:.4f} ± {m['cosine_std']:.4f}  mean-centred cosine {m['cosine_centred']:.4f}")
    # one PCA basis (from the original tokens) for all three grids, so colours are comparable
    flat = tokens[0].flatten(1).T
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = v[:3].T
    proj = (flat - mean) @ basis
    lo, hi = proj.min(0).values, proj.max(0).values
    size = tokens.shape[-1] * args.picture_scale
    panels = [F.interpolate(pca_colours(t[0], basis, mean, lo, hi)[None], size=(size, size), mode="nearest")[0]
              for t in (tokens, compressed, recon)]  # fmt: skip
    picture = torch.cat([F.pad(p, (4, 4, 4, 4), value=1.0) for p in panels], dim=-1)
    out = Path(args.output or Path(args.image).with_suffix(".tokens.png").name)
    lic_common.save_image(picture, out)
    print(f"original | compressed | reconstructed token grids (first 3 principal components as RGB): {out}")
    return {"compressed_shape": tuple(compressed.shape[1:]), **{f"{w}/{k}": v for w, m in report.items() for k, v in m.items()}}


# ---- Command line ----


def parse_args(argv: list[str]) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model_defaults: bool):
        d = (lambda v: v) if model_defaults else (lambda v: None)  # eval/infer: the checkpoint decides
        p.add_argument("--clip_model", default=d("openai/clip-vit-large-patch14-336"), help="CLIP hub id or local folder")
        p.add_argument("--select_layer", type=int, default=d(-2), help="hidden layer whose tokens are compressed (-2: penultimate)")
        p.add_argument("--output_grid_size", type=int, default=d(6), choices=(4, 6, 8, 12), help="compressed grid side")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
        p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast on CUDA")
        p.add_argument("--batch_size", type=int, default=32, help="images per step")
        p.add_argument("--num_workers", type=int, default=4, help="data-loading workers")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
        p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (generator and critic)")

    p = sub.add_parser("train", help="train compressor, decoder and critic", formatter_class=fmt)
    common(p, True)
    p.add_argument("--data_dir", required=True, help="ImageNet-style image folder (searched recursively)")
    p.add_argument("--val_dir", default=None, help="validation folder (default: a hash-selected share of --data_dir)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of --data_dir held out without --val_dir")
    p.add_argument("--subset_size", type=int, default=0, help="use only this many images (0: all)")
    p.add_argument("--cache_tokens", default=None, help="folder caching CLIP's tokens, so later epochs skip CLIP")
    p.add_argument("--output_dir", default="./token_compress_runs", help="checkpoints, config, TensorBoard")
    p.add_argument("--epochs", type=int, default=100, help="epochs")
    p.add_argument("--num_layers", type=int, default=3, help="compressor (and decoder) layers")
    p.add_argument("--hidden_dim", type=int, default=0, help="width inside each block (0: the token width)")
    p.add_argument("--use_residual", action=argparse.BooleanOptionalAction, default=True, help="residual connections")
    p.add_argument("--use_attention", action=argparse.BooleanOptionalAction, default=False, help="attention-based decoder")
    p.add_argument("--attention_heads", type=int, default=8, help="heads of the attention decoder")
    p.add_argument("--multiscale_critic", action=argparse.BooleanOptionalAction, default=False, help="critic that also judges token neighbourhoods")
    p.add_argument("--critic_hidden", type=int, default=512, help="critic width")
    p.add_argument("--n_critic", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--lambda_gp", type=float, default=10.0, help="gradient penalty weight")
    p.add_argument("--wgan_weight", type=float, default=1.0, help="weight of the adversarial loss")
    p.add_argument("--ae_weight", type=float, default=1.0, help="weight of the reconstruction losses")
    p.add_argument("--spatial_weight", type=float, default=1.0, help="weight of the spatial-consistency term within the reconstruction losses")
    p.add_argument("--recon_loss", default="mse", choices=("mse", "cosine", "hybrid"), help="reconstruction loss")
    p.add_argument("--mean_token_batches", type=int, default=8, help="batches used to estimate the mean token (for the centred cosine)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue from output_dir/last_model.pt")
    p.add_argument("--wandb_project", default=None, help="also log to Weights & Biases (if installed; off with WANDB_DISABLED=true)")

    p = sub.add_parser("eval", help="reconstruction figures of a checkpoint and the baselines", formatter_class=fmt)
    common(p, False)
    p.add_argument("--checkpoint", required=True, help="best_model.pt or last_model.pt")
    p.add_argument("--data_dir", required=True, help="image folder")
    p.add_argument("--subset_size", type=int, default=0, help="use only this many images (0: all)")
    p.add_argument("--cache_tokens", default=None, help="CLIP token cache folder")

    p = sub.add_parser("infer", help="one image: compressed shape, figures, token-grid picture", formatter_class=fmt)
    common(p, False)
    p.add_argument("--checkpoint", required=True, help="best_model.pt or last_model.pt")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--output", default=None, help="picture to write (default: <image>.tokens.png here)")
    p.add_argument("--picture_scale", type=int, default=12, help="pixels per original token in the picture")
    args = parser.parse_args(argv)
    return resumed_args(parser, args, argv) if args.command == "train" and args.resume else args


# What a resumed training run may change: how long and how it runs; the rest is the run's.
RESUME_MAY_CHANGE = frozenset({"epochs", "num_workers", "device", "progress", "cache_tokens", "wandb_project"})


def resumed_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """``train --resume``: the settings of the run in ``--output_dir`` (its last checkpoint's), an
    explicit flag overriding what may change (with a printed line) and refused for the rest."""
    path = Path(args.output_dir) / "last_model.pt"
    return lic_common.resumed_settings(parser, args, argv, path, ("args",), RESUME_MAY_CHANGE,
                                       own=("resume", "output_dir", "command"))  # fmt: skip


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        if args.command == "train":
            return Run(args, train=True).fit()
        if args.command == "infer":
            return infer(args)
        run = Run(args, train=False)
        loader = run.loader(lic_common.list_images(args.data_dir)[: args.subset_size or None], shuffle=False)
        metrics = run.evaluate(loader)
        print(format_metrics(metrics))
        return metrics
    except (lic_common.CheckpointError, lic_common.ImageError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

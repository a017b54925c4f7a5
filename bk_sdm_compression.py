"""Diffusion-hyperprior image codec: a masked-diffusion prior over the latent, with BK-SDM or
from-scratch components.

A learned image codec in the mean-scale hyperprior family (Ballé et al. 2018, "Variational image
compression with a scale hyperprior"; Minnen et al. 2018, "Joint autoregressive and hierarchical
priors") whose entropy model for the latent is an absorbing-state (masked) diffusion that reveals
the latent group by group, the autoregressive-diffusion view of Hoogeboom et al. 2022
("Autoregressive Diffusion Models"). The chain starts at the hyper-decoder's prediction mu0, where
nothing of y is known. Each reverse step runs one denoising U-Net, shared by all steps, on the
partly revealed latent and the timestep that says how much is known; the Gaussian it predicts
codes the next group of y (channel slices x checkerboard halves, as the channel-conditional and
checkerboard context models of Minnen & Singh 2020 and He et al. 2021 split it), which is then
revealed. The code length of y is exactly the chain's negative log-likelihood. With
``latent_denoise`` (off by default: sharing the U-Net, it cost the reveal steps their context), a
last U-Net pass with everything revealed predicts and removes what is left of the quantization
error (latent residual prediction, Minnen & Singh 2020) before the synthesis transform.

    x (B, 3, H, W) in [0, 1]
      -> analysis                 y       (B, M, h, w)        h, w = H/s, W/s; s = 16 (g_a) or the VAE's
      -> h_a                      z       (B, N, h/4, w/4)
      -> EntropyBottleneck        z_hat   (coded first)
      -> h_s                      sigma0, mu0   (B, M, h, w) each
      -> for k = 0 .. S-1 (S = diffusion_steps; step k reveals group k):
             U-Net([(state_k - mu0) / sigma0 where known, known_k, mu0, log sigma0], t_k)
                 -> a_k, b_k;  mu_k = mu0 + sigma0 a_k,  sigma_k = sigma0 exp(b_k)     (B, M, h, w)
             group k coded as round(y - mu_k) with GaussianConditional(sigma_k); decoded, it
             replaces mu0 in state_{k+1}
      -> y_hat = state_S (+ a_S, a U-Net pass with everything known, t = 0, with ``latent_denoise``)
      -> synthesis                x_hat   (B, 3, H, W)

``diffusion_steps = 0`` is the hyper-decoder alone (mu0, sigma0 code all of y): the ablation.
Mode ``z_only`` codes nothing but z: y_hat is the U-Net's prediction with nothing revealed.

Training uses teacher forcing. The revealed groups hold the noisy proxy y + u, u ~ U(-1/2, 1/2),
which does not depend on the predicted means (CompressAI's models train with the same proxy), so
the S reveal steps and the denoising step are one batched U-Net pass with no backpropagation
through a chain (``teacher_forcing = "sampled"``: one stratified step per image instead, the
rate weighted to stay unbiased). With ``decoder_ste`` set (late in training: ``--decoder_ste_from``) the
synthesis transform sees round(y - means) + means with a straight-through gradient instead, the
values it decodes (mixed quantization, Minnen & Singh 2020); the rate keeps the proxy. In eval
mode ``forward`` runs the exact chain with rounding, which is what ``compress`` and
``decompress`` do.

Analysis / synthesis are CompressAI-style convolutions with GDN (N channels, M latent channels),
or the pretrained BK-SDM VAE (diffusers ``AutoencoderKL``; nota-ai/bk-sdm-small is a distilled
Stable Diffusion) behind a learned per-channel quantization step. The U-Net is a small diffusers
``UNet2DModel`` trained from scratch, or BK-SDM's pretrained ``UNet2DConditionModel`` with its
input convolution widened as Stable Diffusion's inpainting model widens it (the new input channels
start at zero), a new zero-initialised output convolution, and cross-attention tokens made from
the hyperprior by an adapter in place of text.

Files decode to the same latent on every machine: everything that decides the entropy coder's
parameters (h_s, the U-Net's reverse and denoising steps, BK-SDM's attention included, the means
and scale indexes) runs as an exact integer network (Ballé, Johnston & Minnen 2019, "Integer
networks for data compression with latent-variable models"; JPEG AI's reference decoder; I-BERT's
integer softmax, Kim et al. 2021), see "Exact integer entropy model" below.
``update()`` builds it from the float weights (after ``calibrate`` on training crops, or with
default ranges), a checkpoint stores its tables, and each file carries a digest of the decoded
latent that the decoder checks. The float chain stays for training and for the rate estimate.

Images of any size are padded (replicating the border) to a multiple of the model's total
downsampling factor and cropped back after decoding. ``compress`` / ``decompress`` run the
analysis and synthesis transforms in tiles with a halo of their receptive field (``run_tiled``)
and the integer network in blocks of rows, so memory stays bounded at any size.

The encoder may spend time on a better latent than the analysis transforms' one (``search``,
``compress --effort``): from it, Adam steps on y and z minimise this codec's own D + lambda * bpp
under the annealed rounding of stochastic Gumbel annealing (Yang, Bamler & Mandt 2020, "Improving
inference for neural image compression"), taken in expectation; the result is coded like any
latent, so decoders and files do not change.

Command line (a checkpoint written by ``train_bk_sdm_compression.py``, or a shipped one):
    python bk_sdm_compression.py compress IMAGE OUT.bksd --checkpoint CKPT
    python bk_sdm_compression.py decompress OUT.bksd OUT.png --checkpoint CKPT
    python bk_sdm_compression.py compress A.png B.jpg ... --output_dir DIR --checkpoint CKPT   # DIR/<stem>.bksd
    python bk_sdm_compression.py convert FLOAT.pth EXACT.pth --data TRAINING_IMAGES
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import math
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lic_common
from lic_common import ARCHITECTURE, EFFORT_ITERATIONS, MODES, REVEALS  # shared with the trainer's and evaluator's command lines

# ---- Command line ----
# Before CompressAI is imported (several seconds here: it imports torch_geometric), so that --help
# and argument errors answer at once. What the commands run is at the end of the file.

TILE = 512  # pixels: compress / decompress run analysis and synthesis in tiles of this side (0: whole)
DEFAULT_MAX_PIXELS = 2**26  # pixels: the largest image a file may hold (decoders refuse larger headers)
DEFAULT_EFFORT = 1  # the highest whose encode time stays within about 10x effort 0's (docs/2026-12-08-effort.md)
SEARCH_MAX_PIXELS = 2**20  # the search holds the synthesis transform's activations for backpropagation (7.2 GB at 4.2 MP)
SUFFIXES = {"compress": ".bksd", "decompress": ".png"}  # what --output_dir writes for each input


def parse_args(argv: list[str]) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("compress", "image file(s) -> compressed file(s)"), ("decompress", "compressed file(s) -> PNG")):
        p = sub.add_parser(name, help=help_text, formatter_class=fmt)
        what = "image" if name == "compress" else "compressed file"
        p.add_argument("paths", nargs="+", metavar="PATH",
                       help=f"{what} and the file to write (IN OUT), or with --output_dir any number of {what}s")
        p.add_argument("--output_dir", default=None,
                       help=f"write DIR/<stem>{SUFFIXES[name]} for every input (the model loads once)")
        p.add_argument("--checkpoint", required=True, help="codec checkpoint from train_bk_sdm_compression.py")
        p.add_argument("--device", default="cpu", help="torch device (decode on the device that encoded)")
        p.add_argument("--bk_sdm_path", default=None, help="where the pretrained BK-SDM parts are, if not where the checkpoint says")
        p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image (pixels) accepted")
        p.add_argument("--tile", type=int, default=TILE,
                       help="analysis and synthesis in tiles of this many pixels a side (memory bounded at any size); 0: whole")
        p.add_argument("--diffusion_steps", type=int, default=None,
                       help="reverse steps, the checkpoint's or 0 (default: the checkpoint's to compress, the file's to decompress)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar over several inputs")
        if name == "compress":
            rate = p.add_mutually_exclusive_group()
            rate.add_argument("--quality", type=float, default=None, help="variable-rate checkpoint: the quality, a real number from 1 (smallest files) to its level count")
            rate.add_argument("--target_bpp", type=float, default=None, help="variable-rate checkpoint: search the quality for this many bits per pixel (within 2%%)")
            rate.add_argument("--target_size", type=int, default=None, help="variable-rate checkpoint: search the quality for a file of this many bytes (within 2%%)")
            rate.add_argument("--target_psnr", type=float, default=None, help="variable-rate checkpoint: search the quality for this PSNR in dB (within 0.1 dB)")
            p.add_argument("--max_encodes", type=int, default=8, help="encodes a target search may take")
            p.add_argument("--effort", type=int, default=DEFAULT_EFFORT, choices=range(len(EFFORT_ITERATIONS)),
                           help=f"encoder effort: 0 codes the analysis transform's latent; 1 to {len(EFFORT_ITERATIONS) - 1} search a better one "
                                f"({', '.join(map(str, EFFORT_ITERATIONS[1:]))} iterations; smaller files at equal quality, slower encoding, "
                                f"the same decoder), up to {SEARCH_MAX_PIXELS} pixels")  # fmt: skip
    p = sub.add_parser("convert", formatter_class=fmt,
                       help="a float (format 2) checkpoint -> the exact integer form (format 3), calibrated on training images")
    p.add_argument("input", help="codec checkpoint to convert")
    p.add_argument("output", help="exact checkpoint to write")
    p.add_argument("--data", required=True, help="folder of training images to calibrate on (never the evaluation images)")
    p.add_argument("--crops", type=int, default=16, help="calibration crops")
    p.add_argument("--crop_size", type=int, default=256, help="calibration crop size (pixels)")
    args = parser.parse_args(argv)
    if args.command == "convert":
        if args.crops < 1 or args.crop_size < 64:
            parser.error("--crops must be >= 1 and --crop_size >= 64")
        return args
    if args.max_pixels < 1 or args.tile < 0 or (args.diffusion_steps is not None and args.diffusion_steps < 0):
        parser.error("--max_pixels must be >= 1, --tile and --diffusion_steps >= 0")
    if args.output_dir is None and len(args.paths) != 2:
        parser.error(f"give IN OUT, or inputs and --output_dir DIR ({len(args.paths)} paths given)")
    if args.output_dir is not None:
        stems = collections.Counter(Path(p).stem for p in args.paths)
        if max(stems.values()) > 1:
            parser.error(f"two inputs would write the same file in --output_dir: {', '.join(s for s, n in stems.items() if n > 1)}")
    if args.command == "compress":
        if args.max_encodes < 1 or any(v is not None and v <= 0 for v in (args.quality, args.target_bpp, args.target_size, args.target_psnr)):
            parser.error("--quality, --target_bpp, --target_size, --target_psnr and --max_encodes must be > 0")
    return args


if __name__ == "__main__":
    parse_args(sys.argv[1:])  # --help, or an argument error, ends here; ``main`` parses again


with lic_common.quiet_compressai():  # after the command line: --help and argument errors answer before it loads
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.layers import GDN
    from compressai.models import CompressionModel
    from compressai.models.base import get_scale_table
    from compressai.models.utils import conv, deconv

# ---- Configuration ----

CODEC_FORMAT = 3  # 1: the Gaussian DDIM prior; 2: the float entropy model (convert it: ``convert``)
ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")  # derived by update()
HYPER_FACTOR = 4  # h_a downsamples the latent twice by 2
SCRATCH_TIMESTEPS = 1000  # the from-scratch U-Net's timestep range, as a diffusers schedule's
SEARCH_LR = 0.03  # Adam's step size in the encoder's latent search (``DiffusionHyperprior.search``), first iteration
SEARCH_LR_STEPS = 4  # ... constant over this many iterations; a longer search falls geometrically to SEARCH_LR * (SEARCH_LR_STEPS / iterations)**2
SEARCH_TAU = (0.5, 0.05)  # its annealing temperature, first and last iteration


@dataclass
class CodecConfig:
    """Everything needed to rebuild the model; stored in every checkpoint.

    Pretrained weights are not stored: ``bk_sdm_path`` says where they come from.
    """

    N: int = 128
    M: int = 128
    diffusion_steps: int = 4
    reveal: str = "checkerboard"
    latent_denoise: bool = False
    mode: str = "residual"
    use_pretrained_vae: bool = False
    use_pretrained_unet: bool = False
    bk_sdm_path: str | None = None
    finetune_pretrained: bool = False
    unet_channels: int = 64
    unet_levels: int = 2
    unet_layers_per_block: int = 1
    unet_norm_group_channels: int = 8
    diffusion_strength: float | None = None
    latent_gain_init: float = 4.0
    adapter_grid: int = 8
    scale_table_levels: int = 256
    quality_lambdas: list[float] | None = None  # variable rate: the rate weight of quality 1, 2, ... (decreasing)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reveal not in REVEALS:
            raise ValueError(f"reveal must be one of {REVEALS}, got {self.reveal!r}")
        if self.diffusion_steps < 0:
            raise ValueError(f"diffusion_steps must be >= 0, got {self.diffusion_steps}")
        if self.reveal == "checkerboard" and self.diffusion_steps % 2:
            raise ValueError(
                f"reveal='checkerboard' takes two steps per channel slice (anchors, then the rest): "
                f"diffusion_steps must be even, got {self.diffusion_steps}; or use reveal='channels'"
            )
        if self.diffusion_strength is not None and not 0.0 < self.diffusion_strength <= 1.0:
            raise ValueError(f"diffusion_strength must be in (0, 1], got {self.diffusion_strength}")
        if (self.use_pretrained_vae or self.use_pretrained_unet) and not self.bk_sdm_path:
            raise ValueError("pretrained components need bk_sdm_path (a diffusers folder or a hub id)")
        q = self.quality_lambdas
        if q is not None and (len(q) < 2 or min(q) <= 0 or any(a <= b for a, b in zip(q, q[1:]))):
            raise ValueError(f"quality_lambdas must be 2 or more positive rate weights, decreasing (quality 1 codes smallest), got {q}")

    @property
    def rate_levels(self) -> int:
        """Trained quality levels of a variable-rate model (its qualities are the reals in [1, levels]); 0: fixed rate."""
        return len(self.quality_lambdas or ())

    @property
    def channel_slices(self) -> int:
        """How many channel slices the latent is revealed in."""
        if self.diffusion_steps == 0:
            return 1
        return self.diffusion_steps // 2 if self.reveal == "checkerboard" else self.diffusion_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown codec config fields: {sorted(unknown)}")
        return cls(**d)


# ---- Building blocks ----


def _group_count(channels: int, per_group: int) -> int:
    """GroupNorm groups of ``per_group`` channels (fewer, larger groups when it does not divide)."""
    return max(1, math.gcd(channels, max(1, channels // per_group)))


def analysis_transform(N: int, M: int) -> nn.Sequential:
    """g_a of Ballé et al.: four stride-2 5x5 convolutions with GDN, (B,3,H,W) -> (B,M,H/16,W/16)."""
    return nn.Sequential(conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))


def synthesis_transform(N: int, M: int) -> nn.Sequential:
    """g_s of Ballé et al., the mirror of ``analysis_transform`` with inverse GDN."""
    return nn.Sequential(
        deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
        deconv(N, N), GDN(N, inverse=True), deconv(N, 3),
    )  # fmt: skip


def hyper_analysis(N: int, M: int) -> nn.Sequential:
    """h_a, (B,M,h,w) -> (B,N,h/4,w/4), as in Minnen et al. 2018 (it sees y, not |y|: the
    hyperprior carries the mean as well as the scale)."""
    return nn.Sequential(
        conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
        conv(N, N, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        conv(N, N, stride=2, kernel_size=5),
    )  # fmt: skip


def hyper_synthesis(N: int, M: int) -> nn.Sequential:
    """h_s, (B,N,h/4,w/4) -> (B,2M,h,w): sigma0 and mu0. The widths of Minnen et al. 2018
    (CompressAI's ``mbt2018-mean``), the baseline this codec must beat."""
    return nn.Sequential(
        deconv(N, M, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        deconv(M, M * 3 // 2, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        conv(M * 3 // 2, 2 * M, stride=1, kernel_size=3),
    )  # fmt: skip




def receptive_halo(transform: nn.Module) -> int | None:
    """The margin, in units of its input, that a transform made of convolutions and pointwise
    layers (GDN, activations) reads around each output: a tile on the transform's stride grid run
    with that much more input on every side has the untiled values inside it. Exact, not a bound:
    the margin goes from the output back to the input, layer by layer (four 5x5 stride-2
    convolutions read 30 pixels around their latent; four such transposed ones, 2 latent positions
    around their picture). None when the transform holds anything else (the pretrained VAE's
    attention and GroupNorm see the whole picture: it cannot be tiled)."""
    def layers(module):  # in order; GDN (and its parametrizers) as one pointwise layer
        children = list(module.children())
        return [module] if isinstance(module, GDN) or not children else [m for c in children for m in layers(c)]

    halo = 0  # in the units of the current layer's output
    for layer in reversed(layers(transform)):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding
            if isinstance(layer, nn.Conv2d):  # output o reads inputs s o - p .. s o - p + k - 1
                halo = max(s * halo + p, s * halo + k - s - p)
            else:  # output o reads inputs ceil((o + p - k + 1) / s) .. floor((o + p) / s)
                halo = max((halo + k - 1 - p) // s, (halo + p - 1) // s + 1)
        elif not isinstance(layer, (GDN, nn.LeakyReLU, nn.ReLU, nn.GELU, nn.SiLU, nn.Identity)):
            return None
    return halo


def run_tiled(fn: Callable, x: torch.Tensor, tile: int, halo: int, up: int = 1, down: int = 1) -> torch.Tensor:
    """``fn(x)`` for ``fn`` mapping (B, C, h, w) to (B, C', h * up / down, w * up / down), run on tiles
    of ``tile`` x ``tile`` input positions, each read with ``halo`` more on every side (clipped at
    the borders) and its output cut back to the tile: the untiled ``fn(x)`` up to float rounding when
    ``halo`` covers ``fn``'s receptive field (``receptive_halo``), with memory bounded by the tile.
    ``tile`` and ``halo`` are multiples of ``down`` (the tiles stay on the stride grid); 0 runs whole."""
    H, W = x.shape[-2:]
    if tile <= 0 or (H <= tile and W <= tile):
        return fn(x)
    if tile % down or halo % down:
        raise ValueError(f"tile {tile} and halo {halo} must be multiples of {down}")
    out = None
    for i0 in range(0, H, tile):
        for j0 in range(0, W, tile):
            i1, j1 = min(i0 + tile, H), min(j0 + tile, W)
            a, b = max(0, i0 - halo), max(0, j0 - halo)
            y = fn(x[..., a : min(H, i1 + halo), b : min(W, j1 + halo)])
            if out is None:
                out = y.new_empty(*y.shape[:2], H * up // down, W * up // down)
            out[..., i0 * up // down : i1 * up // down, j0 * up // down : j1 * up // down] = y[
                ..., (i0 - a) * up // down : (i1 - a) * up // down, (j0 - b) * up // down : (j1 - b) * up // down
            ]
            del y
    return out


def soft_round(r: torch.Tensor, tau: float) -> torch.Tensor:
    """The annealed rounding of stochastic Gumbel annealing (Yang, Bamler & Mandt 2020, "Improving
    inference for neural image compression"), taken in expectation: each element of ``r`` rounds
    to floor(r) + 1 with probability softmax(-atanh(distance) / tau) over the two neighbours, so a
    value near an integer stays there, and as ``tau`` falls to 0 the rounding becomes the hard one
    the coder applies. -> floor(r) + that probability: deterministic (SGA draws the rounding instead;
    with few iterations the expectation gains far more, docs/2026-12-08-effort.md), differentiable in
    ``r`` through the distances, (any shape) -> the same shape."""
    low = r.detach().floor()
    d = (r - low).clamp(1e-5, 1 - 1e-5)
    return low + (torch.stack([-torch.atanh(d), -torch.atanh(1 - d)], dim=-1) / tau).softmax(dim=-1)[..., 1]


class VAEAnalysis(nn.Module):
    """Pretrained VAE encoder, then a learned per-channel gain: y = gain * scaling * E(x).

    With a frozen VAE the only rate knob between the latent and the coder is the quantization
    step. A per-channel gain (step = 1 / gain) is invertible, so the frozen decoder always sees
    latents at the scale it was trained on, and it adds M parameters, not a transform to learn.
    """

    def __init__(self, vae: nn.Module, gain_init: float):
        super().__init__()
        self.vae = vae
        channels = vae.config.latent_channels
        self.log_gain = nn.Parameter(torch.full((1, channels, 1, 1), math.log(gain_init)))
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(2 * x - 1).latent_dist.mean
        return (latent - self.shift_factor) * self.scaling_factor * self.log_gain.exp()


class VAESynthesis(nn.Module):
    """Inverse of ``VAEAnalysis``: undo the gain and scaling, then the pretrained VAE decoder."""

    def __init__(self, analysis: VAEAnalysis):
        super().__init__()
        self.analysis = [analysis]  # a list, so the shared VAE is not registered twice

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        a = self.analysis[0]
        latent = y_hat / (a.scaling_factor * a.log_gain.exp()) + a.shift_factor
        return (a.vae.decode(latent).sample + 1) / 2


class CrossAttentionAdapter(nn.Module):
    """Hyperprior features (B, C, h, w) -> cross-attention tokens (B, grid*grid, dim).

    Replaces the text encoder of a pretrained ``UNet2DConditionModel``: a 1x1 convolution to the
    U-Net's cross-attention width, pooled to a fixed grid so the token count does not depend on
    the image size, then layer-normalised as CLIP's text tokens are.
    """

    def __init__(self, in_channels: int, dim: int, grid: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.grid = grid
        self.norm = nn.LayerNorm(dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        tokens = F.adaptive_avg_pool2d(self.proj(cond), self.grid)
        return self.norm(tokens.flatten(2).transpose(1, 2))


class FastGaussianConditional(GaussianConditional):
    """CompressAI's ``GaussianConditional``, with the same indexes and the same bytes, faster.

    ``build_indexes`` is one ``searchsorted`` instead of a pass per scale-table entry, and the
    range coder is handed only the CDF rows (trimmed to their longest length) that this tensor's
    indexes use, instead of the whole table converted to Python lists on every call. The coder
    reads each symbol's CDF through its index, so remapping indexes to the used rows changes
    nothing in the bitstream (``tests/test_codec.py`` checks both against CompressAI).
    """

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        scales = self.lower_bound_scale(scales)
        table = self.scale_table[:-1].to(scales.device, scales.dtype).contiguous()
        return torch.searchsorted(table, scales.contiguous(), right=False).int()

    def _used_tables(self, indexes: torch.Tensor) -> tuple[list, list, list, list]:
        used, remapped = torch.unique(indexes.reshape(-1).long().cpu(), return_inverse=True)
        lengths = self._cdf_length[used]
        cdfs = self._quantized_cdf[used, : int(lengths.max())]
        return remapped.int().tolist(), cdfs.tolist(), lengths.tolist(), self._offset[used].tolist()

    def encode_symbols(self, symbols: torch.Tensor, indexes: torch.Tensor) -> bytes:
        """Integer symbols (n,) with their scale-table indexes (n,) -> one string."""
        self._check_cdf_size()
        idx, cdfs, lengths, offsets = self._used_tables(indexes)
        return self.entropy_coder.encode_with_indexes(symbols.reshape(-1).int().tolist(), idx, cdfs, lengths, offsets)

    def decode_symbols(self, string: bytes, indexes: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode_symbols``: int64 symbols (n,), on the CPU."""
        self._check_cdf_size()
        idx, cdfs, lengths, offsets = self._used_tables(indexes)
        return torch.tensor(self.entropy_coder.decode_with_indexes(string, idx, cdfs, lengths, offsets), dtype=torch.int64)

    def compress(self, inputs: torch.Tensor, indexes: torch.Tensor, means: torch.Tensor | None = None) -> list[bytes]:
        if inputs.size() != indexes.size():
            raise ValueError("`inputs` and `indexes` should have the same size.")
        self._check_cdf_size()
        symbols = self.quantize(inputs, "symbols", means)
        strings = []
        for i in range(symbols.size(0)):
            idx, cdfs, lengths, offsets = self._used_tables(indexes[i])
            strings.append(self.entropy_coder.encode_with_indexes(symbols[i].reshape(-1).tolist(), idx, cdfs, lengths, offsets))
        return strings

    def decompress(self, strings: list[bytes], indexes: torch.Tensor, dtype=torch.float, means=None) -> torch.Tensor:
        if len(strings) != indexes.size(0):
            raise ValueError("Invalid strings or indexes parameters")
        self._check_cdf_size()
        outputs = torch.empty(indexes.size(), dtype=torch.int32)
        for i, s in enumerate(strings):
            idx, cdfs, lengths, offsets = self._used_tables(indexes[i])
            values = self.entropy_coder.decode_with_indexes(s, idx, cdfs, lengths, offsets)
            outputs[i] = torch.tensor(values, dtype=torch.int32).reshape(outputs[i].size())
        return self.dequantize(outputs.to(indexes.device), means, dtype)


def _zero_conv_like(conv_layer: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A convolution of ``conv_layer``'s kernel, stride and padding with new channel counts, all zero."""
    new = nn.Conv2d(in_channels, out_channels, conv_layer.kernel_size, conv_layer.stride, conv_layer.padding)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    return new


def scratch_unet(M: int, channels: int, levels: int, layers_per_block: int, norm_group_channels: int) -> nn.Module:
    """A small diffusers U-Net: [innovation, known mask, mu0, log sigma0] (4M channels) -> a mean
    shift and a log scale factor (2M channels; see ``DiffusionHyperprior._predict``). Its output
    convolution starts at zero, so before training every step predicts what the hyper-decoder
    predicts.

    GroupNorm groups hold ``norm_group_channels`` channels each, and the timestep enters as a
    scale and shift after the normalisation: with one channel per group (diffusers' 32 groups
    at width 32) the normalisation is per channel, which erases the timestep embedding that
    diffusers adds before it, and every per-channel level of the features.
    """
    widths = tuple(channels * 2**i for i in range(levels))
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        in_channels=4 * M,
        out_channels=2 * M,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=layers_per_block,
        norm_num_groups=_group_count(channels, norm_group_channels),
        resnet_time_scale_shift="scale_shift",
        add_attention=False,
    )
    nn.init.zeros_(unet.conv_out.weight)
    nn.init.zeros_(unet.conv_out.bias)
    return unet


def adapt_pretrained_unet(unet: nn.Module, M: int) -> None:
    """Condition BK-SDM's U-Net on the partly revealed latent, in place.

    Its input convolution is widened from M to 4M channels ([innovation, known, mu0, log sigma0]) as
    Stable Diffusion's inpainting model widens it for its mask and masked image: the first M
    input channels keep the pretrained weights, the new ones start at zero. Its output
    convolution (M channels of noise) is replaced by a zero-initialised one giving 2M channels
    (a mean shift and a log scale factor). Both new convolutions are trained even when the rest is frozen.
    """
    old_in = unet.conv_in
    new_in = _zero_conv_like(old_in, 4 * M, old_in.out_channels)
    with torch.no_grad():
        new_in.weight[:, :M] = old_in.weight
        new_in.bias.copy_(old_in.bias)
    unet.conv_in = new_in
    unet.conv_out = _zero_conv_like(unet.conv_out, unet.conv_out.in_channels, 2 * M)


# ---- Exact integer entropy model ----
#
# Everything that decides the entropy coder's parameters (the hyper-decoder h_s, the U-Net of the
# reverse steps and of the denoising step, the cross-attention adapter, the means and the scale
# indexes they give) runs in integer arithmetic, after Ballé, Johnston & Minnen 2019 ("Integer
# networks for data compression with latent-variable models") and JPEG AI's reference decoder: a
# value is an int64 q standing for q * 2**-f, with one exponent f per tensor, calibrated on
# training crops. Convolutions and linear layers multiply integers below 2**19 by per-output-channel
# integer weights below 2**15, so with at most 2**18 terms every partial sum is an integer below
# 2**52: float64 computes them exactly in any order (threads, BLAS blocking, CPU or GPU). They are
# gathers (unfold / fold) and matrix products, never a backend's convolution algorithm (cuDNN's
# FFT and Winograd round), so no process-wide flag can change a value. Attention (BK-SDM's U-Net)
# follows I-BERT (Kim et al. 2021): exact score products, an exp table, integer sums and
# divisions. Everything else is integer: shifts, floor division, an exact integer square root for
# GroupNorm and LayerNorm, tables for SiLU, GELU, exp and log made with ``decimal`` (correctly
# rounded, the same on every machine). The timestep enters as per-step integer tables (the U-Net's
# timestep MLP folded into GroupNorm's affine or conv1's bias), computed once by ``update()`` and
# stored in the checkpoint with the entropy coder's CDF tables, so a decoder recomputes nothing in
# floating point. The coder's scale index comes from an integer log-scale and stored integer
# thresholds.

ACT_BITS = 20  # activations: |q| < 2**(ACT_BITS - 1)
ACT_MAX = 2 ** (ACT_BITS - 1) - 1
WEIGHT_BITS = 16  # weights: |w| <= 2**(WEIGHT_BITS - 1), per output channel
EXACT_SUM_LIMIT = 2**52  # float64 holds every integer below 2**53; one bit spare
SCALE_EXPONENT_MAX = 50  # a weight's exponent plus its input's: keeps the integer biases far below 2**63
EXPONENT_MAX = 24  # no activation is finer than 2**-24 (keeps every shifted product below 2**63)
LOG_BITS = 24  # log-scales and the function tables: fraction bits
SILU_RANGE, SILU_STEP_BITS = 16, 6  # SiLU table over [-16, 16], step 2**-6, interpolated linearly
LN_MANTISSA_BITS = 12  # ln table over [1, 2), 4096 entries
NORM_BITS, NORM_EXTRA_BITS, VAR_SHIFT = 16, 12, 4  # GroupNorm: output fraction bits, precision
LEAKY_SLOPE_BITS = 16
HEADROOM = 4  # calibration: the largest value seen uses a quarter of the range
DEFAULT_EXPONENT = 12  # an uncalibrated point holds [-128, 128) in steps of 2**-12
QUALITY_FRACTION_BITS = 8  # variable rate: a file records its quality q as round((q - 1) * 2**8)
GELU_RANGE, GELU_STEP_BITS = 8, 7  # GELU table over [-8, 8], step 2**-7, interpolated linearly
EXP_RANGE, EXP_STEP_BITS, EXP_BITS = 16, 13, 22  # softmax: exp(-x) over [0, 16] at 2**-22, step 2**-13, nearest entry (beyond: 0)
SCORE_BITS = 24  # softmax: fraction bits kept of a score difference before it is scaled
SCALE_BITS = 24  # attention: fraction bits of the integer score scale (1 / sqrt(head width))
WEIGHT_SUM_BITS = 32  # attention: a row's exp weights are shifted down until they sum below 2**32
ATTENTION_CHUNK = 2**23  # attention: score elements per chunk of queries (memory stays bounded: 64 MB a tensor)
CONV_CHUNK = 2**23  # convolutions: float64 intermediate elements per block of rows (64 MB)
CHANNEL_CHUNK = 16  # the U-Net's input layer: revealed latent channels convolved at a time


def _decimal_table(fn, xs) -> torch.Tensor:
    """round(fn(x) * 2**LOG_BITS) for Decimal x, with ``decimal`` (correctly rounded everywhere)."""
    from decimal import ROUND_HALF_EVEN, Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 40
        scale = Decimal(2**LOG_BITS)
        return torch.tensor([int((fn(x) * scale).to_integral_value(ROUND_HALF_EVEN)) for x in xs], dtype=torch.int64)


@functools.lru_cache(maxsize=None)
def _silu_table() -> torch.Tensor:
    from decimal import Decimal

    n = 2 * SILU_RANGE * 2**SILU_STEP_BITS + 1
    xs = [Decimal(i) / 2**SILU_STEP_BITS - SILU_RANGE for i in range(n)]
    return _decimal_table(lambda x: x / (1 + (-x).exp()), xs)


@functools.lru_cache(maxsize=None)
def _ln_table() -> tuple[torch.Tensor, int]:
    """ln(1 + i / 2**LN_MANTISSA_BITS), i < 2**LN_MANTISSA_BITS, and ln 2, at LOG_BITS."""
    from decimal import Decimal

    xs = [1 + Decimal(i) / 2**LN_MANTISSA_BITS for i in range(2**LN_MANTISSA_BITS)]
    return _decimal_table(lambda x: x.ln(), xs), int(_decimal_table(lambda x: x.ln(), [Decimal(2)])[0])


# pi to 60 digits, for GELU's normal CDF (``decimal`` has no erf)
_PI = "3.14159265358979323846264338327950288419716939937510582097494459"


@functools.lru_cache(maxsize=None)
def _gelu_table() -> torch.Tensor:
    """GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 over [-GELU_RANGE, GELU_RANGE], erf by its
    Taylor series in ``decimal`` at 80 digits (the series' terms stay far inside that precision)."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 80
        two_over_sqrt_pi = 2 / Decimal(_PI).sqrt()
        inv_sqrt2 = 1 / Decimal(2).sqrt()
        tiny = Decimal(10) ** -50

        def gelu(x):
            u = x * inv_sqrt2
            total = term = u
            n = 0
            while True:
                n += 1
                term = -term * u * u / n
                add = term / (2 * n + 1)
                total += add
                if abs(add) < tiny:
                    break
            return x * (1 + two_over_sqrt_pi * total) / 2

        n = 2 * GELU_RANGE * 2**GELU_STEP_BITS + 1
        values = [gelu(Decimal(i) / 2**GELU_STEP_BITS - GELU_RANGE) for i in range(n)]
    return _decimal_table(lambda v: v, values)


@functools.lru_cache(maxsize=None)
def _exp_table() -> torch.Tensor:
    """round(exp(-i 2**-EXP_STEP_BITS) * 2**EXP_BITS), i = 0 .. EXP_RANGE 2**EXP_STEP_BITS, as float64
    (integers): powers of exp(-2**-EXP_STEP_BITS) (from ``decimal``) in 128-bit fixed point, Python
    integers only (the accumulated error stays below 2**-100, far under the rounding)."""
    from decimal import Decimal, localcontext

    bits = 128
    with localcontext() as ctx:
        ctx.prec = 60
        ratio = int((Decimal(-1) / 2**EXP_STEP_BITS).exp() * 2**bits)
    v, half, values = 1 << bits, 1 << (bits - EXP_BITS - 1), []
    for _ in range(EXP_RANGE * 2**EXP_STEP_BITS + 1):
        values.append((v + half) >> (bits - EXP_BITS))
        v = (v * ratio + (1 << (bits - 1))) >> bits
    return torch.tensor(values, dtype=torch.float64)


def _shift(q: torch.Tensor, s) -> torch.Tensor:
    """q * 2**-s rounded (half up); s an int or an int64 tensor broadcastable to q, any sign."""
    if not torch.is_tensor(s):
        return q << -s if s <= 0 else (q + (1 << (s - 1))) >> s
    left, right = (-s).clamp(min=0), s.clamp(min=0)
    half = torch.bitwise_left_shift(torch.ones_like(right), right) >> 1
    return ((q << left) + half) >> right


def _shift_(q: torch.Tensor, s: int) -> torch.Tensor:
    """``_shift`` in place (an int ``s``): q itself, rounded."""
    return q.bitwise_left_shift_(-s) if s <= 0 else q.add_(1 << (s - 1)).bitwise_right_shift_(s)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b rounded (half up), integers, b > 0."""
    return torch.div(2 * a + b, 2 * b, rounding_mode="floor")


def _div_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``_div`` in place on ``a`` (a fresh tensor): a / b rounded (half up), integers, b > 0."""
    return a.mul_(2).add_(b).div_(2 * b, rounding_mode="floor")


def _div_scaled(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """a * 2**k / b rounded (half up), integers, b > 0 and below 2**40, without forming a * 2**k:
    the quotient and the remainder are scaled apart."""
    if k <= 0:
        return _div(a, b << -k)
    quotient = torch.div(a, b, rounding_mode="floor")
    return (quotient << k) + _div((a - quotient * b) << k, b)


def _isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) of non-negative int64 values below 2**62, exactly (the float guess corrected)."""
    r = v.double().sqrt().floor().long()
    for _ in range(2):
        r = r - (r * r > v).long()
        r = r + ((r + 1) * (r + 1) <= v).long()
    return r


def _pow2(e) -> torch.Tensor | float:
    """2**e as float64, exactly (no pow())."""
    if torch.is_tensor(e):
        return torch.where(e >= 0, (1 << e.clamp(min=0)).double(), 1 / (1 << (-e).clamp(min=0)).double())
    return float(1 << e) if e >= 0 else 1 / float(1 << -e)


def _exponent_for(maximum: float, limit: int = ACT_MAX) -> int:
    """The largest f with maximum * HEADROOM * 2**f <= limit (calibration, encoder side only)."""
    if maximum <= 0:
        return DEFAULT_EXPONENT
    return int(max(0, min(EXPONENT_MAX, math.floor(math.log2(limit / (HEADROOM * maximum))))))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product of integer-valued float64 tensors whose every partial sum is an integer below
    2**53 (proven per layer when the tables are built): exact in any summation order, on any BLAS,
    CPU or GPU (float64 has no TF32 or reduced-precision path)."""
    return torch.matmul(a, b)


def _by_taps(C: int, O: int, s: tuple) -> bool:
    """Whether ``_conv_rows`` convolves C -> O channels as one product of all taps and shifted
    additions (stride 1, narrowing: cheaper than an im2col buffer of C * kh * kw rows)."""
    return s == (1, 1) and C >= 2 * O


def _conv_rows(x: torch.Tensor, weight: torch.Tensor, k: tuple, s: tuple, p: tuple) -> torch.Tensor:
    """``_integer_conv``'s convolution on one block of rows (float64 in and out)."""
    B, C, H, W = x.shape
    O, (kh, kw), (sh, sw), (ph, pw) = weight.shape[0], k, s, p
    out_h, out_w = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return _matmul(weight.reshape(O, C), x.reshape(B, C, H * W)).view(B, O, H, W)
    if _by_taps(C, O, s):  # one product of all taps, then shifted additions
        taps = _matmul(weight.permute(2, 3, 0, 1).reshape(kh * kw * O, C), x.reshape(B, C, H * W)).view(B, kh, kw, O, H, W)
        out = x.new_zeros(B, O, out_h, out_w)
        for dy in range(kh):
            for dx in range(kw):  # out[i, j] += tap(dy, dx)[i + dy - ph, j + dx - pw] where that is inside
                i0, i1, j0, j1 = max(0, ph - dy), min(out_h, H + ph - dy), max(0, pw - dx), min(out_w, W + pw - dx)
                out[:, :, i0:i1, j0:j1] += taps[:, dy, dx, :, i0 + dy - ph : i1 + dy - ph, j0 + dx - pw : j1 + dx - pw]
        return out
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (B, C*kh*kw, L)
    return _matmul(weight.reshape(O, -1), cols).view(B, O, out_h, out_w)


def _integer_conv(x: torch.Tensor, weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A convolution (or transposed convolution) of integer-valued tensors (``layer`` gives kernel,
    stride and padding) -> int64, exact: gathers (unfold), exact products (``_matmul``) on float64
    and, for a transposed convolution, integer sums of the overlaps (fold). No convolution algorithm
    of a backend is involved, so no process-wide flag (cuDNN's, oneDNN's) can change a value. A
    stride-1 convolution that narrows the channels is one product of all taps followed by shifted
    additions: no im2col buffer (4-5x faster for the U-Net's input layer). Blocks of rows keep every
    float64 intermediate below ``CONV_CHUNK`` elements, so memory stays bounded at any size."""
    B, C, H, W = x.shape
    weight = weight.double()
    if isinstance(layer, nn.ConvTranspose2d):  # weight (C, O, kh, kw): each input row scatters kh output rows
        O, (kh, kw), (sh, sw), (ph, pw) = weight.shape[1], layer.kernel_size, layer.stride, layer.padding
        out_h = (H - 1) * sh - 2 * ph + kh + layer.output_padding[0]
        out_w = (W - 1) * sw - 2 * pw + kw + layer.output_padding[1]
        out = torch.zeros(B, O, out_h, out_w, dtype=torch.long, device=x.device)
        rows = max(1, CONV_CHUNK // (B * O * kh * kw * W))
        for i0 in range(0, H, rows):  # input rows i0..i1-1 reach output rows i0 sh - ph .. (i1 - 1) sh - ph + kh - 1
            xs = x[:, :, i0 : i0 + rows].double()
            n = xs.shape[2]
            cols = _matmul(weight.reshape(C, O * kh * kw).t(), xs.reshape(B, C, n * W))  # (B, O*kh*kw, n*W)
            part = F.fold(cols, ((n - 1) * sh + kh, out_w), (kh, kw), padding=(0, pw), stride=(sh, sw))
            del cols
            top = i0 * sh - ph
            a, b = max(0, top), min(out_h, top + part.shape[2])
            out[:, :, a:b] += part[:, :, a - top : b - top].long()
        return out
    O, k, s, p = weight.shape[0], layer.kernel_size, layer.stride, layer.padding
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    out_h, out_w = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    per_row = B * max(O, (O if _by_taps(C, O, tuple(s)) else C) * kh * kw) * W  # intermediate elements per output row
    rows = max(1, CONV_CHUNK // per_row)
    if rows >= out_h:
        return _conv_rows(x.double(), weight, k, s, p).long()
    out = torch.empty(B, O, out_h, out_w, dtype=torch.long, device=x.device)
    for r0 in range(0, out_h, rows):  # output rows r0..r1-1 read input rows r0 sh - ph .. (r1 - 1) sh - ph + kh - 1
        r1 = min(out_h, r0 + rows)
        lo, hi = r0 * sh - ph, (r1 - 1) * sh - ph + kh
        xs = F.pad(x[:, :, max(0, lo) : min(H, hi)].double(), (0, 0, max(0, -lo), max(0, hi - H)))  # zeros: the padding
        out[:, :, r0:r1] = _conv_rows(xs, weight, k, s, (0, pw)).long()
    return out


def _sum_terms(layer: nn.Module) -> int:
    """The most products one output of ``layer`` sums: in * kh * kw for a convolution, in *
    ceil(kh / sh) * ceil(kw / sw) for a transposed one (an output takes every kernel tap whose
    stride phase is its own), in for a linear layer."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return w.shape[1]
    if isinstance(layer, nn.ConvTranspose2d):
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        return w.shape[0] * -(-kh // sh) * -(-kw // sw)
    return w.shape[1] * w.shape[2] * w.shape[3]


def _adaptive_windows(size: int, grid: int) -> tuple[list[int], list[int]]:
    """Start and end of adaptive average pooling's windows (PyTorch's: floor(i n / g), ceil((i + 1) n / g))."""
    return [i * size // grid for i in range(grid)], [-(-(i + 1) * size // grid) for i in range(grid)]


class ExactError(RuntimeError):
    """A model or configuration that has no exact integer form."""


class PretrainedError(RuntimeError):
    """BK-SDM's pretrained components could not be loaded (no network, no local copy, a bad folder)."""


class _FloatOps:
    """The integer network's operations in floating point, recording each point's largest
    magnitude: the calibration pass (and, in tests, the check that the walk is the float model)."""

    def __init__(self, temb: dict | None = None):
        self.maxima: dict[str, float] = {}
        self.temb = temb  # {id(resnet): (B, C') time embedding} for the current timesteps (unet_time_tables)

    def _seen(self, name, x):
        self.maxima[name] = max(self.maxima.get(name, 0.0), float(x.detach().abs().max()))
        return x

    def input(self, name, x):
        return self._seen(name, x.double())

    def conv(self, name, x, layer, time=None):
        w, b = layer.weight.double(), layer.bias.double()
        if isinstance(layer, nn.ConvTranspose2d):
            y = F.conv_transpose2d(x, w, b, layer.stride, layer.padding, layer.output_padding)
        else:
            y = F.conv2d(x, w, b, layer.stride, layer.padding)
        if time is not None:  # ResnetBlock2D's "default" timestep path: added after conv1
            y = y + self.temb[id(time)].double()[:, :, None, None]
        return self._seen(name, y)

    def linear(self, name, x, layer, cached=False):
        return self._seen(name, F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double()))

    def norm(self, name, x, norm, time=None):
        y = F.group_norm(x, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
        if time is not None:
            scale, shift = self.temb[id(time)].double().chunk(2, dim=1)
            y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self._seen(name, y)

    def layer_norm(self, name, x, norm):
        w = None if norm.weight is None else norm.weight.double()
        b = None if norm.bias is None else norm.bias.double()
        return self._seen(name, F.layer_norm(x, norm.normalized_shape, w, b, norm.eps))

    def attention(self, name, q, k, v, attn):
        B, N, C = q.shape
        heads = attn.heads
        qh, kh, vh = (t.reshape(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=attn.scale)
        return self._seen(name, out.transpose(1, 2).reshape(B, N, C))

    def gate(self, name, x):
        a, b = x.chunk(2, dim=-1)
        return self._seen(name, a * F.gelu(b))

    def pool(self, x, grid):
        return F.adaptive_avg_pool2d(x, grid)

    def silu(self, x):
        return F.silu(x)

    def leaky(self, x, slope):
        return F.leaky_relu(x, slope)

    def add(self, name, a, b):
        return self._seen(name, a + b)

    def cat(self, name, a, b):
        return self._seen(name, torch.cat([a, b], dim=1))

    def upsample(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def tokens(self, x):
        return x.flatten(2).transpose(1, 2)

    def image(self, x, like):
        return x.transpose(1, 2).reshape(like.shape)


def _walk_hyper(ops, h_s: nn.Sequential, x):
    """h_s, layer by layer (convolutions, transposed convolutions and LeakyReLUs)."""
    for i, layer in enumerate(h_s):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            x = ops.conv(f"hs.{i}", x, layer)
        elif isinstance(layer, nn.LeakyReLU):
            x = ops.leaky(x, layer.negative_slope)
        else:
            raise ExactError(f"h_s layer {type(layer).__name__} has no exact integer form")
    return x


def _walk_resnet(ops, name, res, x):
    """diffusers' ``ResnetBlock2D``: the timestep scales and shifts after norm2 (``scale_shift``,
    the from-scratch U-Net) or is added after conv1 (``default``, Stable Diffusion's)."""
    default = res.time_embedding_norm == "default" and res.time_emb_proj is not None
    h = ops.silu(ops.norm(f"{name}.norm1", x, res.norm1))
    h = ops.conv(f"{name}.conv1", h, res.conv1, time=res if default else None)
    h = ops.silu(ops.norm(f"{name}.norm2", h, res.norm2, time=None if default else res))
    h = ops.conv(f"{name}.conv2", h, res.conv2)
    skip = ops.conv(f"{name}.shortcut", x, res.conv_shortcut) if res.conv_shortcut is not None else x
    return ops.add(f"{name}.out", skip, h)


def _walk_attention(ops, name, attn, x, context):
    """diffusers' ``Attention`` (self-attention where ``context`` is None): projections, softmax
    attention per head, output projection. The keys and values of the context are the same at every
    step (``cached``)."""
    cross = context is not None
    kv = context if cross else x
    q = ops.linear(f"{name}.q", x, attn.to_q)
    k = ops.linear(f"{name}.k", kv, attn.to_k, cached=cross)
    v = ops.linear(f"{name}.v", kv, attn.to_v, cached=cross)
    return ops.linear(f"{name}.out", ops.attention(f"{name}.attn", q, k, v, attn), attn.to_out[0])


def _walk_transformer(ops, name, tr, x, context):
    """diffusers' ``Transformer2DModel`` on a feature map: GroupNorm, projection in (1x1
    convolution or linear), ``BasicTransformerBlock``s (LayerNorm, self-attention, cross-attention on
    the hyperprior's tokens, GEGLU feed-forward, each residual), projection out, residual."""
    h = ops.norm(f"{name}.norm", x, tr.norm)
    if tr.use_linear_projection:
        h = ops.linear(f"{name}.proj_in", ops.tokens(h), tr.proj_in)
    else:
        h = ops.tokens(ops.conv(f"{name}.proj_in", h, tr.proj_in))
    for i, block in enumerate(tr.transformer_blocks):
        b = f"{name}.{i}"
        h = ops.add(f"{b}.res1", _walk_attention(ops, f"{b}.attn1", block.attn1, ops.layer_norm(f"{b}.norm1", h, block.norm1), None), h)
        if block.attn2 is not None:
            a = _walk_attention(ops, f"{b}.attn2", block.attn2, ops.layer_norm(f"{b}.norm2", h, block.norm2), context)
            h = ops.add(f"{b}.res2", a, h)
        ff = block.ff.net
        g = ops.gate(f"{b}.ff.gate", ops.linear(f"{b}.ff.proj", ops.layer_norm(f"{b}.norm3", h, block.norm3), ff[0].proj))
        h = ops.add(f"{b}.res3", ops.linear(f"{b}.ff.down", g, ff[2]), h)
    if tr.use_linear_projection:
        h = ops.image(ops.linear(f"{name}.proj_out", h, tr.proj_out), x)
    else:
        h = ops.conv(f"{name}.proj_out", ops.image(h, x), tr.proj_out)
    return ops.add(f"{name}.out", h, x)


def _walk_unet(ops, unet, x, context=None):
    """diffusers' ``UNet2DModel.forward`` (the from-scratch U-Net) or ``UNet2DConditionModel.forward``
    (BK-SDM's, with ``context`` the cross-attention tokens), op by op, the timestep entering through
    GroupNorm's affine or conv1's bias (its MLP folded into per-step tables)."""
    h = ops.conv("unet.conv_in", x, unet.conv_in)
    skips = [h]
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for j, (res, tr) in enumerate(zip(block.resnets, attentions)):
            h = _walk_resnet(ops, f"unet.down{i}.{j}", res, h)
            if tr is not None:
                h = _walk_transformer(ops, f"unet.down{i}.attn{j}", tr, h, context)
            skips.append(h)
        if block.downsamplers is not None:
            h = ops.conv(f"unet.down{i}.down", h, block.downsamplers[0].conv)
            skips.append(h)
    mid = unet.mid_block
    if mid is not None:
        h = _walk_resnet(ops, "unet.mid.0", mid.resnets[0], h)
        for j, (tr, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if tr is not None:
                h = _walk_transformer(ops, f"unet.mid.attn{j}", tr, h, context)
            h = _walk_resnet(ops, f"unet.mid.{j + 1}", res, h)
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for j, (res, tr) in enumerate(zip(block.resnets, attentions)):
            h = _walk_resnet(ops, f"unet.up{i}.{j}", res, ops.cat(f"unet.up{i}.cat{j}", h, skips.pop()))
            if tr is not None:
                h = _walk_transformer(ops, f"unet.up{i}.attn{j}", tr, h, context)
        if block.upsamplers is not None:
            h = ops.conv(f"unet.up{i}.up", ops.upsample(h), block.upsamplers[0].conv)
    h = ops.silu(ops.norm("unet.norm_out", h, unet.conv_norm_out))
    return ops.conv("unet.conv_out", h, unet.conv_out)


def _walk_adapter(ops, adapter, cond):
    """``CrossAttentionAdapter``: the average pooling first (an integer sum and a division), then
    the 1x1 convolution (the same map: both are linear), then LayerNorm."""
    h = ops.conv("adapter.proj", ops.pool(cond, adapter.grid), adapter.proj)
    return ops.layer_norm("adapter.norm", ops.tokens(h), adapter.norm)


def check_exact_unet(unet: nn.Module, adapter: nn.Module | None = None) -> None:
    """``ExactError`` naming what the integer walk does not reproduce, unless ``unet`` (and the
    cross-attention ``adapter``) are what it walks: diffusers' ``UNet2DModel`` with scale-shift
    timesteps (the from-scratch U-Net), or ``UNet2DConditionModel`` as Stable Diffusion 1.x / 2.x
    and BK-SDM build it."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg, problems = unet.config, []
    if isinstance(unet, UNet2DModel):
        if cfg.resnet_time_scale_shift != "scale_shift" or cfg.add_attention:
            problems.append("timestep norm or attention other than the from-scratch U-Net's")
        if set(cfg.down_block_types) != {"DownBlock2D"} or set(cfg.up_block_types) != {"UpBlock2D"}:
            problems.append("blocks other than DownBlock2D / UpBlock2D")
        if cfg.time_embedding_type != "positional" or cfg.class_embed_type is not None:
            problems.append("Fourier time or class embeddings")
    elif isinstance(unet, UNet2DConditionModel):
        blocks = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        other = sorted((set(cfg.down_block_types) | set(cfg.up_block_types)) - blocks)
        if other:
            problems.append(f"blocks {other}")
        if cfg.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
            problems.append(f"mid block {cfg.mid_block_type}")
        if cfg.resnet_time_scale_shift != "default" or cfg.resnet_skip_time_act or cfg.resnet_out_scale_factor != 1:
            problems.append("a timestep path other than Stable Diffusion's (resnet_time_scale_shift, skip_time_act, out_scale_factor)")
        extras = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "timestep_post_act",
                  "time_embedding_act_fn")  # fmt: skip
        if cfg.time_embedding_type != "positional" or any(getattr(cfg, k, None) is not None for k in extras):
            problems.append("class, addition, encoder or extra time embeddings")
        only_cross = getattr(cfg, "only_cross_attention", False)
        if getattr(cfg, "dual_cross_attention", False) or (any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross):
            problems.append("dual or cross-only attention")
        for name, m in unet.named_modules():
            kind = type(m).__name__
            if kind == "Attention" and (m.norm_cross is not None or m.group_norm is not None or m.spatial_norm is not None
                                        or m.residual_connection or m.rescale_output_factor != 1
                                        or getattr(m, "norm_q", None) is not None or getattr(m, "norm_k", None) is not None):
                problems.append(f"{name}: attention with extra normalisations or rescaling")
            elif kind == "BasicTransformerBlock" and (m.norm_type != "layer_norm" or m.pos_embed is not None
                                                      or type(m.ff.net[0]).__name__ != "GEGLU" or m.only_cross_attention
                                                      or getattr(m, "attention_type", "default") != "default"
                                                      or (m.attn2 is not None and not m.attn2.is_cross_attention)):
                problems.append(f"{name}: a transformer block other than LayerNorm + attention + GEGLU")
            elif kind == "GEGLU" and getattr(m, "approximate", "none") != "none":
                problems.append(f"{name}: tanh-approximated GELU")
            elif kind == "Transformer2DModel" and (not m.is_input_continuous or m.config.norm_type != "layer_norm"):
                problems.append(f"{name}: a transformer on other than continuous feature maps")
            elif kind in ("Upsample2D", "Downsample2D") and (type(m.conv) is not nn.Conv2d or getattr(m, "norm", None) is not None
                                                             or (kind == "Upsample2D" and not m.interpolate)
                                                             or (kind == "Downsample2D" and m.padding != 1)):
                problems.append(f"{name}: a resampler other than nearest x2 + conv / a padded stride-2 conv")
    else:
        problems.append(f"{type(unet).__name__} (neither diffusers' UNet2DModel nor UNet2DConditionModel)")
    if cfg.act_fn != "silu" or cfg.center_input_sample or getattr(cfg, "mid_block_scale_factor", 1) != 1:
        problems.append("an activation other than SiLU, input centring or a mid-block scale factor")
    if cfg.downsample_padding != 1:
        problems.append("downsample padding other than 1")
    if adapter is not None and type(adapter).__name__ != "CrossAttentionAdapter":
        problems.append(f"cross-attention tokens from {type(adapter).__name__}")
    if problems:
        raise ExactError("this U-Net has no exact integer form: " + "; ".join(problems))


def unet_time_tables(unet: nn.Module, timesteps: torch.Tensor) -> dict:
    """{id(resnet): (T, C') time embedding}: what each resnet's timestep projection gives at each
    of the chain's timesteps (the float model's own computation, run once). ``scale_shift``
    resnets split it into a scale and a shift; ``default`` ones add it after conv1."""
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(timesteps).to(unet.dtype))
        out = {}
        for res in unet.modules():
            if getattr(res, "time_emb_proj", None) is not None:
                out[id(res)] = res.time_emb_proj(res.nonlinearity(emb)).float()
    return out


def _table_function(q: torch.Tensor, f: int, table: torch.Tensor, low: int, step_bits: int, above) -> torch.Tensor:
    """A tabulated function of int64 q at exponent f (table at LOG_BITS from ``low``, step
    2**-step_bits), interpolated linearly in integers; below the table 0, above it ``above(q)``.
    In place where it can: a few tensors of q's size at a time."""
    d = f - step_bits
    last = table.numel() - 1
    i = (q >> d if d >= 0 else q << -d).add_(-low << step_bits)  # the table position
    ic = i.clamp(0, last - 1)
    value = table[ic]  # lo
    if d >= 0:  # + (hi - lo) * frac, frac the bits of q below the step, shifted back
        step = table[ic.add_(1)].sub_(value).mul_(q & ((1 << d) - 1))
        value.add_(_shift_(step, d))
        del step
    del ic
    value = _shift_(value, LOG_BITS - f).masked_fill_(i < 0, 0)
    beyond = i >= last
    return torch.where(beyond, above(q), value) if bool(beyond.any()) else value


def _standardize(g: torch.Tensor, f: int, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dimension of int64 g at exponent f, in integers
    (an exact integer square root), at NORM_BITS. In place where it can."""
    n = g.shape[-1]
    c = g - _div(g.sum(-1, keepdim=True), n)
    cs = _shift(c, VAR_SHIFT)
    var = torch.div(cs.mul_(cs).sum(-1, keepdim=True), n, rounding_mode="floor")  # at 2 (f - VAR_SHIFT)
    del cs
    epsilon = math.ceil(eps * 4.0 ** (f - VAR_SHIFT + NORM_EXTRA_BITS))
    std = _isqrt((var << 2 * NORM_EXTRA_BITS) + epsilon)  # at f - VAR_SHIFT + NORM_EXTRA_BITS
    return _div_(c.bitwise_left_shift_(NORM_BITS - VAR_SHIFT + NORM_EXTRA_BITS), std)


class _IntOps:
    """The integer network's operations: values are (q, f), int64 q standing for q * 2**-f."""

    def __init__(self, exact: "ExactPrior", rows: torch.Tensor | None = None, first_acc: torch.Tensor | None = None,
                 cache: dict | None = None):  # fmt: skip
        self.ex = exact
        self.rows = rows  # (B,) the timestep row of each image's per-step tables
        self.first_acc = first_acc  # the U-Net input layer's sums, when ExactPrior.predict made them
        self.cache = {} if cache is None else cache  # what is the same at every step of one chain

    def _finish(self, acc, p):
        """round((acc + bias) * 2**-shift), clamped: in place on ``acc`` (a fresh sum)."""
        if p["left"] is not None:
            acc.bitwise_left_shift_(p["left"])
        bias = p["bias_half"]
        if p.get("time"):  # (T, C, 1, 1): each image's step
            bias = bias[self.rows]
        return acc.add_(bias).bitwise_right_shift_(p["right"]).clamp_(-ACT_MAX, ACT_MAX), p["f_out"]

    def conv(self, name, x, layer, time=None):
        q, f = x
        p = self.ex.convs[name]
        assert f == p["f_in"], f"{name}: input exponent {f}, the tables were built for {p['f_in']}"
        if name == "unet.conv_in" and self.first_acc is not None:
            acc = self.first_acc.clone()  # it may be the chain's cached sum
        else:
            acc = _integer_conv(q, p["weight"], layer)
        return self._finish(acc, p)

    def linear(self, name, x, layer, cached=False):
        if cached and name in self.cache:
            return self.cache[name]
        q, f = x
        p = self.ex.convs[name]
        assert f == p["f_in"], f"{name}: input exponent {f}, the tables were built for {p['f_in']}"
        out = self._finish(_matmul(q.double(), p["weight"].double().t()).long(), p)
        if cached:
            self.cache[name] = out
        return out

    def _affine(self, name, xn, channels_last=False):
        t = self.ex.norms[name]
        rows = self.rows if t["scale"].shape[0] > 1 else torch.zeros(1, dtype=torch.long, device=xn.device)
        shape = (-1, 1, t["scale"].shape[1]) if channels_last else (-1, t["scale"].shape[1], 1, 1)
        scale, offset = t["scale"][rows].view(shape), t["offset"][rows].view(shape)
        out = _shift_(xn.mul_(scale), NORM_BITS + t["e_scale"] - t["f_out"]).add_(offset)  # xn: _standardize's, ours
        return out.clamp_(-ACT_MAX, ACT_MAX), t["f_out"]

    def norm(self, name, x, norm, time=None):
        q, f = x
        B, C, H, W = q.shape
        xn = _standardize(q.reshape(B, norm.num_groups, -1), f, norm.eps).reshape(B, C, H, W)  # at NORM_BITS
        return self._affine(name, xn)

    def layer_norm(self, name, x, norm):
        q, f = x
        return self._affine(name, _standardize(q, f, norm.eps), channels_last=True)

    def attention(self, name, q, k, v, attn):
        """softmax(q k^T * scale) v per head in integer arithmetic (I-BERT's recipe, Kim et al. 2021),
        carried out on integer-valued float64 whose every value stays below 2**53 (exact, and
        vectorised where int64 is not): exact score products, the row maximum subtracted, the
        difference scaled by the integer scale and rounded to the exp table's step, exp looked up,
        the weights shifted down per row until they sum below 2**WEIGHT_SUM_BITS, an exact product
        with v, and one integer division per output by the row's sum. Chunks of queries bound the
        memory."""
        (q, fq), (k, fk), (v, fv) = q, k, v
        a = self.ex.attention[name]
        B, N, C = q.shape
        L, heads = k.shape[1], attn.heads
        d = C // heads
        fs, scale = fq + fk, a["scale"]
        shift = max(0, fs - SCORE_BITS)  # the score differences keep fs - shift fraction bits
        cap = float(((EXP_RANGE << (fs + SCALE_BITS)) // scale) >> shift << shift)  # beyond: exp = 0
        to_index = math.ldexp(1.0, -(fs - shift + SCALE_BITS - EXP_STEP_BITS))  # powers of two: exact
        table = self.ex.exp_table
        kh = k.view(B, L, heads, d).permute(0, 2, 3, 1).double()  # (B, H, d, L)
        vh = v.view(B, L, heads, d).transpose(1, 2).double()  # (B, H, L, d)
        qh = q.view(B, N, heads, d).transpose(1, 2)
        out = torch.empty(B, heads, N, d, dtype=torch.long, device=q.device)
        chunk = max(1, ATTENTION_CHUNK // (B * heads * L))
        for s in range(0, N, chunk):
            z = _matmul(qh[:, :, s : s + chunk].double(), kh)  # scores at fs, exact
            torch.sub(z.amax(-1, keepdim=True), z, out=z)  # >= 0, below 2**53
            z.clamp_(max=cap)
            if shift:
                z.mul_(math.ldexp(1.0, -shift)).floor_()  # at fs - shift <= SCORE_BITS fraction bits
            # times the integer scale and a power of two: one rounding of a product exact in 49 bits,
            # so exact; then the nearest table entry (ties to even), never past the last (the cap)
            z.mul_(scale * to_index).round_()
            e = table[z.long()]
            del z
            total = e.sum(-1, keepdim=True)  # exact: at most 2**EXP_BITS L
            _, exponent = torch.frexp(total)
            down = (exponent.long() - WEIGHT_SUM_BITS).clamp_(min=0)
            if bool((down > 0).any()):
                e.mul_(_pow2(-down)).add_(0.5).floor_()  # exact: powers of two, below 2**53
                total = e.sum(-1, keepdim=True)
            acc = _matmul(e, vh).long()  # |partial sums| <= 2**WEIGHT_SUM_BITS ACT_MAX: exact
            out[:, :, s : s + chunk] = _div_scaled(acc, total.long(), a["f_out"] - fv).clamp(-ACT_MAX, ACT_MAX)
            del e, acc
        return out.transpose(1, 2).reshape(B, N, C), a["f_out"]

    def gate(self, name, x):
        q, f = x
        a, b = q.chunk(2, dim=-1)
        g = _table_function(b, f, self.ex.gelu_table, -GELU_RANGE, GELU_STEP_BITS, lambda v: v)
        fo = self.ex.exponents[name]
        return _shift(a * g, 2 * f - fo).clamp(-ACT_MAX, ACT_MAX), fo

    def pool(self, x, grid):
        q, f = x
        out, counts = q, 1
        for dim in (2, 3):
            starts, ends = _adaptive_windows(q.shape[dim], grid)
            csum = torch.cat([torch.zeros_like(out.narrow(dim, 0, 1)), out.cumsum(dim)], dim)
            out = csum.index_select(dim, torch.tensor(ends, device=q.device)) - csum.index_select(dim, torch.tensor(starts, device=q.device))
            lengths = torch.tensor([e - s for s, e in zip(starts, ends)], device=q.device)
            counts = counts * (lengths[:, None] if dim == 2 else lengths[None, :])  # (grid, grid) window sizes
        return _div(out, counts), f

    def silu(self, x):
        q, f = x
        return _table_function(q, f, self.ex.silu_table, -SILU_RANGE, SILU_STEP_BITS, lambda v: v), f

    def leaky(self, x, slope):
        q, f = x
        k = round(slope * 2**LEAKY_SLOPE_BITS)
        return torch.where(q >= 0, q, _shift(q * k, LEAKY_SLOPE_BITS)), f

    def _to(self, x, f):
        return _shift(x[0], x[1] - f).clamp(-ACT_MAX, ACT_MAX)

    def add(self, name, a, b):
        f = self.ex.exponents[name]
        return (self._to(a, f) + self._to(b, f)).clamp(-ACT_MAX, ACT_MAX), f

    def cat(self, name, a, b):
        f = self.ex.exponents[name]
        return torch.cat([self._to(a, f), self._to(b, f)], dim=1), f

    def upsample(self, x):
        return x[0].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1), x[1]

    def tokens(self, x):
        return x[0].flatten(2).transpose(1, 2), x[1]

    def image(self, x, like):
        return x[0].transpose(1, 2).reshape(like[0].shape), x[1]


class ExactPrior(nn.Module):
    """The integer form of h_s, the cross-attention adapter and the U-Net, and what the coder needs
    from them.

    Made from the float model and a state: a new one from ``build`` (what ``update()`` does), or a
    checkpoint's (``load_exact_state``). ``state()`` is what a checkpoint stores; the integer
    weights follow from it and the float weights by exact operations only. Its tables live on the
    float model's device.
    Latent values are int64 at exponent ``f_latent`` (h_s's output exponent): means, mu0, sigma0
    and the decoded latent y_hat = symbol * 2**f_latent + mean.
    """

    def __init__(self, model: "DiffusionHyperprior", state: dict):
        super().__init__()
        device = model.h_s[0].weight.device
        self.exponents: dict[str, int] = dict(state["exponents"])
        self.f_unet_in = self.exponents.get("unet.in")
        self.convs, self.norms = {}, {}
        self.conv_time = state.get("conv_time", {})  # "default" resnets: conv1's time embedding per step (T, C)
        self.attention = {k: dict(v) for k, v in state.get("attention", {}).items()}  # the integer score scales
        self.silu_table = _silu_table().to(device)
        self.gelu_table = _gelu_table().to(device) if self.attention else None
        self.exp_table = _exp_table().to(device) if self.attention else None
        ln_table, self.ln2 = _ln_table()
        self.ln_table = ln_table.to(device)
        self.thresholds = state["thresholds"].to(device)
        self.log_steps = state.get("log_steps")  # variable rate: (levels, M) at LOG_BITS
        self._int_convs(lambda ops: _walk_hyper(ops, model.h_s, None), "hs.in")
        self.f_latent = self.convs[next(reversed(self.convs))]["f_out"]  # h_s's last convolution: mu0, sigma0
        self.scale_floor = math.ceil(float(model.gaussian_conditional.lower_bound_scale.bound) * 2**self.f_latent)
        if model.unet is not None and "unet.conv_in" in self.exponents:
            if model.adapter is not None:
                self._int_convs(lambda ops: _walk_adapter(ops, model.adapter, None), "adapter.in")
            context = self.exponents.get("adapter.norm")
            self._int_convs(lambda ops: _walk_unet(ops, model.unet, None, context), "unet.in")
            for name, t in state["norms"].items():
                self.norms[name] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
        self.has_unet = bool(self.norms)

    # -- construction --

    def _int_convs(self, walk: Callable, first: str) -> None:
        """Integer weights, biases and output shifts of every convolution and linear layer ``walk``
        meets, from the float weights and the exponents (frexp, scaling by powers of two and
        rounding: exact). The weights are integers below 2**15, kept in float32 (exactly)."""
        ops = _ShapeOps(self.exponents, first)
        walk(ops)
        for name, (layer, f_in, timed) in ops.layers.items():
            w = layer.weight.detach().double()
            out_dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
            per_out = w.transpose(0, out_dim).reshape(w.shape[out_dim], -1)
            terms = _sum_terms(layer)
            if ACT_MAX * 2 ** (WEIGHT_BITS - 1) * terms >= EXACT_SUM_LIMIT:
                raise ExactError(f"{name}: {terms} terms per output could exceed float64's exact integers")
            _, ex = torch.frexp(per_out.abs().amax(1))
            e = torch.where(per_out.abs().amax(1) > 0, WEIGHT_BITS - 1 - ex.long(), torch.zeros_like(ex.long()))
            e = e.clamp(max=SCALE_EXPONENT_MAX - f_in)
            shape = [1] * w.dim()
            shape[out_dim] = -1
            weight = torch.round(w * _pow2(e).view(shape)).float()
            bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(len(e), dtype=torch.float64, device=w.device)
            if timed is not None:  # one bias per step: conv1's bias plus the step's time embedding
                bias = bias[None] + self.conv_time[name].to(bias.device)
            bias = torch.round(bias * _pow2(e + f_in)).long()
            f_out = self.exponents[name]
            shift = e + f_in - f_out  # per output channel; out = round((acc + bias) * 2**-shift)
            left, right = (-shift).clamp(min=0), shift.clamp(min=0)
            half = (1 << right) >> 1
            tail = (None,) * (0 if isinstance(layer, nn.Linear) else 2)  # (O, 1, 1) for maps, (O,) for tokens
            self.convs[name] = {
                "weight": weight, "bias_half": ((bias << left) + half)[(..., *tail)], "right": right[(..., *tail)],
                "left": left[(..., *tail)] if bool(left.any()) else None, "f_in": f_in, "f_out": f_out, "time": timed is not None,
            }  # fmt: skip

    @staticmethod
    def build(model: "DiffusionHyperprior", maxima: dict[str, float] | None) -> dict:
        """The state of a new exact form: exponents (from calibration maxima, else the default),
        the per-step tables (the timestep MLP folded into GroupNorm's affine or conv1's bias), the
        normalisations' integer affines, the attention scales and the scale thresholds."""
        names = _ShapeOps.point_names(model)
        exponents = {n: _exponent_for(maxima[n]) if maxima and n in maxima else DEFAULT_EXPONENT for n in names}
        norms, conv_time, attention = {}, {}, {}
        if model.unet is not None and "unet.conv_in" in exponents:
            check_exact_unet(model.unet, model.adapter)
            times = unet_time_tables(model.unet, model.step_timesteps.to(model.unet.device))
            walked = _ShapeOps(exponents, "unet.in")
            norm_layers = {}
            if model.adapter is not None:
                adapter = _ShapeOps(exponents, "adapter.in")
                _walk_adapter(adapter, model.adapter, None)
                norm_layers |= adapter.norm_layers
            _walk_unet(walked, model.unet, None, exponents.get("adapter.norm"))
            norm_layers |= walked.norm_layers
            for name, (norm, time) in norm_layers.items():
                C = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.normalized_shape[-1]
                gamma = torch.ones(1, C, dtype=torch.float64) if norm.weight is None else norm.weight.detach().double().cpu()[None]
                beta = torch.zeros(1, C, dtype=torch.float64) if norm.bias is None else norm.bias.detach().double().cpu()[None]
                if time is not None:
                    scale, shift = times[id(time)].double().cpu().chunk(2, dim=1)
                    gamma, beta = gamma * (1 + scale), beta * (1 + scale) + shift
                _, ex = torch.frexp(gamma.abs().max())
                e_scale = WEIGHT_BITS - 1 - int(ex)
                norms[name] = {
                    "scale": torch.round(gamma * 2.0**e_scale).long(),
                    "offset": torch.round(beta * 2.0 ** exponents[name]).long(),
                    "e_scale": e_scale,
                    "f_out": exponents[name],
                }
            conv_time = {name: times[id(time)].double().cpu() for name, (_, _, time) in walked.layers.items() if time is not None}
            for name, attn in walked.attentions.items():
                width = attn.to_q.out_features // attn.heads
                if width * ACT_MAX**2 >= EXACT_SUM_LIMIT or 2**WEIGHT_SUM_BITS * ACT_MAX >= EXACT_SUM_LIMIT:
                    raise ExactError(f"{name}: heads {width} wide could exceed float64's exact integers")
                attention[name] = {"scale": round(attn.scale * 2**SCALE_BITS), "f_out": exponents[name]}
        table = model.gaussian_conditional.scale_table.double()
        thresholds = torch.floor(table[:-1].log() * 2**LOG_BITS).long()
        state = {"exponents": exponents, "norms": norms, "thresholds": thresholds}
        state |= {"conv_time": conv_time} if conv_time else {}
        state |= {"attention": attention} if attention else {}
        if model.log_steps is not None:
            state["log_steps"] = torch.round(model.log_steps.detach().double().cpu() * 2**LOG_BITS).long()
        return state

    def state(self) -> dict:
        state = {"exponents": dict(self.exponents), "norms": {k: dict(v) for k, v in self.norms.items()},
                 "thresholds": self.thresholds}  # fmt: skip
        state |= {"conv_time": dict(self.conv_time)} if self.conv_time else {}
        state |= {"attention": {k: dict(v) for k, v in self.attention.items()}} if self.attention else {}
        return state | ({"log_steps": self.log_steps} if self.log_steps is not None else {})

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the integer tables; no dtype change reaches them (``.half()``
        on the model leaves the exact form exact)."""

        def move(t):
            return None if t is None else fn(t).to(t.dtype)

        self.silu_table, self.ln_table, self.thresholds = move(self.silu_table), move(self.ln_table), move(self.thresholds)
        self.gelu_table, self.exp_table = move(self.gelu_table), move(self.exp_table)
        if self.log_steps is not None:
            self.log_steps = move(self.log_steps)
        for table in (*self.convs.values(), *self.norms.values()):
            for k, v in table.items():
                if torch.is_tensor(v):
                    table[k] = move(v)
        return super()._apply(fn, recurse)

    # -- the coder's parameters --

    def hyper(self, z_hat: torch.Tensor, h_s: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
        """z_hat (float, integers plus the bottleneck's medians) -> (mu0, sigma0) at f_latent;
        sigma0 lower-bounded as the float model bounds it."""
        f = self.exponents["hs.in"]
        q = torch.round(z_hat.double() * _pow2(f)).long().clamp(-ACT_MAX, ACT_MAX)
        out, _ = _walk_hyper(_IntOps(self), h_s, (q, f))
        sigma0, mu0 = out.chunk(2, dim=1)
        return mu0.clone(), sigma0.clamp(min=self.scale_floor)  # two tensors, not views of one

    def log(self, s: torch.Tensor) -> torch.Tensor:
        """ln(s * 2**-f_latent) at LOG_BITS for positive int64 s (exponent by frexp, mantissa table)."""
        _, e = torch.frexp(s.double())
        e = e.long() - 1  # 2**e <= s < 2**(e + 1)
        m = torch.where(e >= LN_MANTISSA_BITS, s >> (e - LN_MANTISSA_BITS).clamp(min=0),
                        s << (LN_MANTISSA_BITS - e).clamp(min=0))  # the top LN_MANTISSA_BITS + 1 bits
        return (e - self.f_latent) * self.ln2 + self.ln_table[m - (1 << LN_MANTISSA_BITS)]

    def steps(self, code: int | None, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantization step of each latent channel: (M,) int64 at f_latent, and its log at
        LOG_BITS. Variable rate: the stored log-steps of the two levels around the file's quality
        ``code``, interpolated in integers, and exp by ``decimal`` (correctly rounded, the same on
        every machine). Fixed rate (``code`` None): 1."""
        device = self.thresholds.device
        if code is None:
            return torch.full((M,), 1 << self.f_latent, device=device), torch.zeros(M, dtype=torch.long, device=device)
        from decimal import ROUND_HALF_EVEN, Decimal, localcontext

        one = 1 << QUALITY_FRACTION_BITS
        i = min(code >> QUALITY_FRACTION_BITS, len(self.log_steps) - 2)
        frac = code - i * one
        log = (self.log_steps[i].cpu() * (one - frac) + self.log_steps[i + 1].cpu() * frac) >> QUALITY_FRACTION_BITS
        with localcontext() as ctx:
            ctx.prec = 40
            scale = Decimal(2**self.f_latent)
            step = [int(((Decimal(v) / 2**LOG_BITS).exp() * scale).to_integral_value(ROUND_HALF_EVEN)) for v in log.tolist()]
        return torch.tensor(step).clamp(min=1).to(device), log.to(device)

    def indexes(self, log_scale: torch.Tensor) -> torch.Tensor:
        """Scale-table index of each log-scale: the number of thresholds below it."""
        return torch.searchsorted(self.thresholds, log_scale.contiguous(), right=False)

    def predict(self, unet, adapter, state, known, rows, mu0, sigma0, log_sigma0, cache: dict | None = None, denoise: bool = False):
        """One U-Net pass on the partly revealed latent (int64 at f_latent; ``rows`` (B,) the step
        of each image) -> (means at f_latent, log-scales at LOG_BITS); with ``denoise``, the mean
        shift a at f_latent instead (the denoising step).

        The input layer's sums are split, exactly (integer sums): the hyperprior's half of the
        input is the same at every step (kept in ``cache``, with the adapter's cross-attention
        tokens and their keys and values), and channels with nothing revealed contribute zero, so
        only the revealed channels are convolved."""
        f, fi = self.f_latent, self.f_unet_in
        M = state.shape[1]
        weight, layer = self.convs["unet.conv_in"]["weight"], unet.conv_in
        cache = {} if cache is None else cache

        def hyperprior(exponent):  # [mu0, log sigma0] at ``exponent``: the U-Net's and the adapter's input
            return torch.cat([_shift(mu0, f - exponent), _shift(log_sigma0, LOG_BITS - exponent)], dim=1).clamp(-ACT_MAX, ACT_MAX)

        if "hyperprior" not in cache:
            cache["hyperprior"] = _integer_conv(hyperprior(fi), weight[:, 2 * M :], layer)
        if adapter is not None and "context" not in cache:
            fa = self.exponents["adapter.in"]
            cache["context"] = _walk_adapter(_IntOps(self), adapter, (hyperprior(fa), fa))
        acc = cache["hyperprior"]
        active = known.flatten(2).any(2).any(0).nonzero().flatten()  # channels with something revealed: only they are convolved
        for c in active.split(CHANNEL_CHUNK) if len(active) else ():  # a few channels at a time: exact in any order
            innovation = _div_((state[:, c] - mu0[:, c]).bitwise_left_shift_(fi), sigma0[:, c])  # (state - mu0) / sigma0
            innovation.masked_fill_(~known[:, c], 0)  # where known, 0 elsewhere
            x = torch.cat([innovation, known[:, c].long() << fi], dim=1).clamp_(-ACT_MAX, ACT_MAX)
            acc = acc + _integer_conv(x, weight[:, torch.cat([c, c + M])], layer)
            del innovation, x
        ops = _IntOps(self, rows, first_acc=acc, cache=cache)
        out, fo = _walk_unet(ops, unet, (None, fi), cache.get("context"))
        shift, log_factor = out.chunk(2, dim=1)
        if denoise:
            return _shift(shift, fo - f)
        means = _shift_(shift.mul_(sigma0), fo).add_(mu0).clamp_(-ACT_MAX, ACT_MAX)  # in place: the two halves of ``out``
        return means, _shift_(log_factor, fo - LOG_BITS).add_(log_sigma0)


class _ShapeOps:
    """A walk that runs nothing: it lists the points in order (``names``), finds each layer's
    input exponent and collects the layers, normalisations and attentions (``ExactPrior`` builds
    its integer tables from it). With no exponents yet, every point reads as exponent 0."""

    def __init__(self, exponents: dict | None, first: str):
        self.exponents = collections.defaultdict(int) if exponents is None else exponents
        self.first, self.names = first, []
        self.layers, self.norm_layers, self.attentions = {}, {}, {}

    def _point(self, name):
        self.names.append(name)
        return self.exponents[name]

    def conv(self, name, x, layer, time=None):
        self.layers[name] = (layer, self.exponents[self.first] if x is None else x, time)
        return self._point(name)

    def linear(self, name, x, layer, cached=False):
        return self.conv(name, x, layer)

    def norm(self, name, x, norm, time=None):
        self.norm_layers[name] = (norm, time)
        return self._point(name)

    def layer_norm(self, name, x, norm):
        return self.norm(name, x, norm)

    def attention(self, name, q, k, v, attn):
        self.attentions[name] = attn
        return self._point(name)

    def gate(self, name, x):
        return self._point(name)

    def add(self, name, a, b):
        return self._point(name)

    cat = add

    def silu(self, x):
        return x

    def leaky(self, x, slope):
        return x

    upsample = tokens = silu

    def pool(self, x, grid):
        return x

    def image(self, x, like):
        return x

    @staticmethod
    def point_names(model) -> list[str]:
        """Every point that gets an exponent: h_s's input and layers, then the adapter's, then the U-Net's."""
        ops = _ShapeOps(None, "hs.in")
        _walk_hyper(ops, model.h_s, None)
        names = ["hs.in", *ops.names]
        if model.unet is not None:
            context = None
            if model.adapter is not None:
                ops = _ShapeOps(None, "adapter.in")
                _walk_adapter(ops, model.adapter, None)
                names += ["adapter.in", *ops.names]
                context = 0
            ops = _ShapeOps(None, "unet.in")
            _walk_unet(ops, model.unet, None, context)
            names += ["unet.in", *ops.names]
        return names


class _RecordingHyper(nn.Module):
    """h_s run through ``_FloatOps`` (calibration)."""

    def __init__(self, h_s: nn.Sequential, ops: _FloatOps):
        super().__init__()
        self.inner, self.ops = h_s, ops

    def forward(self, z_hat):
        return _walk_hyper(self.ops, self.inner, self.ops.input("hs.in", z_hat)).float()


class _RecordingAdapter(nn.Module):
    """The cross-attention adapter run through ``_FloatOps`` (calibration)."""

    def __init__(self, adapter: nn.Module, ops: _FloatOps):
        super().__init__()
        self.inner, self.ops = adapter, ops

    def forward(self, cond):
        return _walk_adapter(self.ops, self.inner, self.ops.input("adapter.in", cond))


class _RecordingUNet(nn.Module):
    """The U-Net run through ``_FloatOps`` (calibration); returns what diffusers' does."""

    def __init__(self, unet: nn.Module, ops: _FloatOps):
        super().__init__()
        self.inner, self.ops = unet, ops
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states=None, **kwargs):
        self.ops.temb = unet_time_tables(self.inner, t)
        context = None if encoder_hidden_states is None else encoder_hidden_states.double()
        return SimpleNamespace(sample=_walk_unet(self.ops, self.inner, self.ops.input("unet.in", x), context).float())


def _pack_tables(coder: nn.Module) -> dict:
    """A coder's CDF tables without their padding (rows cut to their lengths)."""
    cdf, lengths = coder._quantized_cdf.int(), coder._cdf_length.int()
    flat = torch.cat([cdf[i, : int(n)] for i, n in enumerate(lengths)]) if len(lengths) else cdf.flatten()
    return {"cdf": flat, "cdf_length": lengths, "offset": coder._offset.int()}


def _unpack_tables(coder: nn.Module, packed: dict) -> None:
    lengths = packed["cdf_length"].int()
    cdf = torch.zeros(len(lengths), int(lengths.max()) if len(lengths) else 0, dtype=torch.int32)
    for i, row in enumerate(packed["cdf"].split(lengths.tolist())):
        cdf[i, : len(row)] = row
    coder._quantized_cdf, coder._cdf_length, coder._offset = cdf, lengths, packed["offset"].int()


def hyper_digest(z_hat: torch.Tensor) -> bytes:
    """4 bytes identifying one image's decoded hyper-latent (integers): a decoder checks it before
    the reverse chain runs, so a damaged header (another image size, say) fails at 1/256 of the
    latent's cost."""
    return hashlib.blake2b(z_hat.detach().cpu().contiguous().numpy().astype("<f4").tobytes(), digest_size=4).digest()


def latent_digest(y_q: torch.Tensor, z_hat: torch.Tensor) -> bytes:
    """8 bytes identifying one image's decoded latent: the integer y_hat and z_hat."""
    h = hashlib.blake2b(digest_size=8)
    h.update(y_q.detach().cpu().contiguous().numpy().astype("<i8").tobytes())
    h.update(z_hat.detach().cpu().contiguous().numpy().astype("<f4").tobytes())
    return h.digest()


# ---- The model ----


def _predicted(k: int, selected: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``_run_chain``'s ``code_group`` for mode z_only: nothing is coded, the group takes its means."""
    return means


class DiffusionHyperprior(CompressionModel):
    """The codec. Build it with ``create_bk_sdm_compression_model`` or ``from_config``.

    ``forward(x)`` -> {"x_hat", "y", "z", "y_hat", "prediction", "scales", "likelihoods": {"y"?, "z"}};
    ``compress(x)`` -> {"strings", "shape"}: one string list per revealed group, then z's, with
    ``shape`` the image's (H, W), and the ``digests`` of the latent the decoder must reach;
    ``decompress(strings, shape, digests=...)`` -> {"x_hat", "y_hat", "digests"} (it refuses another latent);
    ``search(x, iterations)`` -> (y, z), a latent for ``compress(x, latents=...)`` of lower D + lambda R.
    """

    def __init__(
        self,
        config: CodecConfig,
        analysis: nn.Module,
        synthesis: nn.Module,
        unet: nn.Module | None,
        adapter: nn.Module | None,
        latent_factor: int,
        num_train_timesteps: int,
        frozen_prefixes: tuple[str, ...] = (),
        trained_in_frozen: tuple[str, ...] = (),
    ):
        super().__init__()
        self.config = config
        N, M = config.N, config.M
        if config.channel_slices > M:
            raise ValueError(f"{config.diffusion_steps} steps of reveal={config.reveal!r} need more channel slices than the M={M} latent channels")
        self.g_a = analysis
        self.g_s = synthesis
        self.h_a = hyper_analysis(N, M)
        self.h_s = hyper_synthesis(N, M)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = FastGaussianConditional(None)
        self.unet = unet
        self.adapter = adapter
        self.frozen_prefixes = frozen_prefixes
        self.trained_in_frozen = trained_in_frozen  # new layers inside a frozen pretrained module
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1) if unet is not None else 1
        self.pad_multiple = latent_factor * max(HYPER_FACTOR, unet_factor)
        self.latent_factor = latent_factor
        # compress / decompress: analysis and synthesis in tiles of ``tile`` pixels (0: whole), when
        # they are local (receptive_halo: the halos, rounded up to the stride grid)
        self.tile = TILE
        halo_a, halo_s = receptive_halo(analysis), receptive_halo(synthesis)
        self.halo_a = None if halo_a is None else -(-halo_a // latent_factor) * latent_factor
        self.halo_s = halo_s
        # timestep of reverse step k (k groups known), k = 0..S: from the start of the covered
        # part of the schedule (nothing known) down to 0 (everything known: the denoising step)
        S = config.diffusion_steps
        strength = config.diffusion_strength
        if strength is None:  # see create_bk_sdm_compression_model
            strength = PRETRAINED_DEFAULT_STRENGTH if config.use_pretrained_unet else 1.0
        top = (num_train_timesteps - 1) * strength
        self.step_timesteps = torch.tensor([round(top * (S - k) / S) for k in range(S + 1)] if S else [0])
        self.set_inference_steps(S)
        # decode with the denoising step; False measures it on its own (the bitstream is the same)
        self.latent_denoise = config.latent_denoise
        # training: the decoder sees the rounded latent (straight-through), not the noisy proxy
        self.decoder_ste = False
        # training: "all" reveal steps teacher-forced for every image, or one "sampled" per image
        self.teacher_forcing = "all"
        # the integer form that compress / decompress run (update() or a checkpoint makes it), and
        # the calibration maxima its exponents come from (None: the default exponents)
        self.exact: ExactPrior | None = None
        self.calibration: dict[str, float] | None = None
        # variable rate: the log quantization step of each latent channel at each quality level
        levels = config.rate_levels
        self.log_steps = nn.Parameter(torch.zeros(levels, M)) if levels else None
        # the rate weight the codec was trained for (fixed-rate; a checkpoint records it): ``search``'s
        self.lambda_rate: float | None = None

    # -- variable rate --

    def quality_code(self, quality: float | None) -> int | None:
        """The integer a file records for ``quality`` (steps of 2**-QUALITY_FRACTION_BITS), None for
        a fixed-rate model; ValueError where the model takes no such quality."""
        levels = self.config.rate_levels
        if not levels:
            if quality is not None:
                raise ValueError("this checkpoint codes at one rate: it takes no quality (train a variable-rate one for that)")
            return None
        if quality is None or not 1 <= quality <= levels:
            raise ValueError(f"this variable-rate checkpoint needs a quality in [1, {levels}], got {quality}")
        return round((quality - 1) * 2**QUALITY_FRACTION_BITS)

    def recorded_quality(self, quality: float) -> float:
        """``quality`` as a file records it (a multiple of 2**-QUALITY_FRACTION_BITS above 1)."""
        return 1 + self.quality_code(quality) / 2**QUALITY_FRACTION_BITS

    def _interpolate(self, table: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` (levels, ...) at real positions quality - 1 (B,), linearly."""
        pos = (quality.float() - 1).clamp(0, len(table) - 1)
        i = pos.floor().long().clamp(max=len(table) - 2)
        frac = (pos - i).view(-1, *[1] * (table.dim() - 1))
        return table[i] * (1 - frac) + table[i + 1] * frac

    def quantization_step(self, quality: torch.Tensor) -> torch.Tensor:
        """(B,) qualities in [1, levels] -> (B, M, 1, 1) quantization steps, log-linear between the
        trained levels (floating point, for training; the coder uses ``ExactPrior.steps``)."""
        return self._interpolate(self.log_steps, quality).exp()[:, :, None, None]

    def quality_lambda(self, quality: torch.Tensor) -> torch.Tensor:
        """(B,) qualities -> (B,) rate weights, log-linear between the levels' ``quality_lambdas``."""
        lambdas = torch.tensor(self.config.quality_lambdas, dtype=torch.float64, device=quality.device)
        return self._interpolate(lambdas.log(), quality).exp().float()

    def _step_for(self, quality, batch: int, device) -> torch.Tensor | None:
        if not self.config.rate_levels:
            if quality is not None:
                raise ValueError("this model codes at one rate: it takes no quality")
            return None
        if quality is None:
            raise ValueError(f"a variable-rate model needs a quality in [1, {self.config.rate_levels}] per image")
        quality = torch.as_tensor(quality, dtype=torch.float32, device=device).expand(batch)
        return self.quantization_step(quality)

    # -- the masked-diffusion prior --

    def set_inference_steps(self, steps: int) -> None:
        """Decode with the chain of ``diffusion_steps`` reverse steps, or with 0 (the hyper-decoder
        alone codes all of y: what the steps contribute, on the same weights). The group a step
        reveals is fixed by the configuration, so no other count exists; the file header
        records the count and the decoder refuses another."""
        if steps not in (0, self.config.diffusion_steps):
            raise ValueError(
                f"this model reveals its latent in {self.config.diffusion_steps} steps: it codes with "
                f"{self.config.diffusion_steps} or 0 (the hyper-decoder alone), not {steps}"
            )
        self.inference_steps = steps

    def reveal_groups(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(M, h, w) long: the reverse step that reveals each latent element.

        ``checkerboard``: channel slice c (M split into S/2 near-equal slices) is revealed in two
        steps, 2c its anchors ((i + j) even) and 2c+1 the rest (ELIC's spatial-channel order).
        ``channels``: step c reveals slice c whole. With 0 steps, or in mode ``z_only``, one group.
        """
        M = self.config.M
        if self.inference_steps == 0 or self.config.mode == "z_only":
            return torch.zeros(M, height, width, dtype=torch.long, device=device)
        slices = torch.cat([torch.full((len(s),), i) for i, s in enumerate(torch.arange(M).tensor_split(self.config.channel_slices))])
        groups = slices.to(device)[:, None, None].expand(M, height, width)
        if self.config.reveal == "channels":
            return groups.contiguous()
        i, j = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        return 2 * groups + ((i + j) % 2)[None]

    def _predict(self, state: torch.Tensor, known: torch.Tensor, step: torch.Tensor, mu0: torch.Tensor,
                 s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """One U-Net pass: (B, M, h, w) state, known mask, hyperprior; (B,) step -> fp32 (means,
        scales, residual), each (B, M, h, w).

        The U-Net works in the hyperprior's normalised coordinates, as a diffusion model works on
        unit-variance data: it sees the revealed values as innovations (y - mu0) / s0 (0 where
        unknown; s0 = sigma0 lower-bounded as the likelihood bounds it) and predicts a mean shift
        in units of s0 and a log scale factor: mu = mu0 + s0 * a, sigma = s0 * exp(b). Its
        normalisation layers would otherwise leave it no way to output a per-image magnitude. The
        denoising step's residual is ``a`` itself, in latent units, as the quantization error is.
        """
        innovation = torch.where(known, (state - mu0) / s0, torch.zeros_like(state))
        inputs = torch.cat([innovation, known.to(state.dtype), mu0, s0.log()], dim=1)
        t = self.step_timesteps.to(step.device)[step]
        if self.adapter is None:
            out = self.unet(inputs, t).sample
        else:
            out = self.unet(inputs, t, encoder_hidden_states=self.adapter(torch.cat([mu0, s0.log()], dim=1))).sample
        shift, log_factor = out.float().chunk(2, dim=1)
        return mu0 + s0 * shift, s0 * log_factor.exp(), shift

    def _teacher_forced(self, y_noisy: torch.Tensor, mu0: torch.Tensor, s0: torch.Tensor):
        """Training: the reverse steps (and the denoising step) in one batched U-Net pass, the
        revealed groups holding ``y_noisy``. -> (means, scales, residual or None, rate weight or
        None), (B, M, h, w) each.

        ``teacher_forcing == "all"``: every reverse step for every image (S x the batch). With
        ``"sampled"``, one step per image (stratified: image b takes step (b + r) mod S, r random),
        so the pass costs one batch whatever S is; only that step's group gets its Gaussian, and
        the rate weight (S_elements / group elements there, 0 elsewhere) makes the weighted code
        length an unbiased estimate of the whole latent's."""
        if self.inference_steps == 0:
            return mu0, s0, None, None
        B, M, h, w = y_noisy.shape
        device = y_noisy.device
        groups = self.reveal_groups(h, w, device)
        residual_mode = self.config.mode == "residual"
        reveal = self.inference_steps if residual_mode else 1
        sampled = self.teacher_forcing == "sampled" and reveal > 1
        if sampled:
            step = (torch.arange(B, device=device) + torch.randint(reveal, (), device=device)) % reveal
            rows = torch.arange(B, device=device)
        else:
            step = torch.arange(reveal, device=device).repeat_interleave(B)
            rows = torch.arange(B, device=device).repeat(reveal)
        denoise = residual_mode and self.config.latent_denoise
        if denoise:
            step = torch.cat([step, torch.full((B,), reveal, device=device)])
            rows = torch.cat([rows, torch.arange(B, device=device)])
        known = groups[None] < step[:, None, None, None]  # (passes, M, h, w)
        state = torch.where(known, y_noisy[rows], mu0[rows])
        means, scales, residual = self._predict(state, known, step, mu0[rows], s0[rows])
        n = 1 if sampled else reveal
        pick = (groups[None] == step[: n * B, None, None, None]).view(n, B, M, h, w)  # the group each pass codes
        means = torch.where(pick, means[: n * B].view(n, B, M, h, w), 0).sum(0)
        scales = torch.where(pick, scales[: n * B].view(n, B, M, h, w), 0).sum(0)
        weight = None
        if sampled:  # the other groups keep the hyperprior's Gaussian, at weight 0
            means, scales = torch.where(pick[0], means, mu0), torch.where(pick[0], scales, s0)
            sizes = torch.bincount(groups.flatten(), minlength=reveal).double()
            weight = pick[0] * (groups.numel() / sizes)[step[:B], None, None, None]
        return means, scales, residual[-B:] if denoise else None, weight

    def _run_chain(self, mu0: torch.Tensor, s0: torch.Tensor, code_group: Callable) -> tuple:
        """The reverse chain, as the decoder runs it. ``code_group(k, selected, means, scales)``
        gets group k's Gaussians ((B, n_k) each) and returns its decoded values.
        -> (y_hat, means, scales, state before the denoising step), (B, M, h, w) each."""
        B, M, h, w = mu0.shape
        groups = self.reveal_groups(h, w, mu0.device)
        state, means, scales = mu0.clone(), mu0.clone(), s0.clone()
        for k in range(max(1, self.inference_steps if self.config.mode == "residual" else 1)):
            selected = groups == k
            if self.inference_steps:
                step = torch.full((B,), k, device=mu0.device)
                mu_k, sigma_k, _ = self._predict(state, (groups < k).expand(B, M, h, w), step, mu0, s0)
                means[:, selected] = mu_k[:, selected]
                scales[:, selected] = sigma_k[:, selected]
            state[:, selected] = code_group(k, selected, means[:, selected], scales[:, selected])
        y_hat = state
        if self.inference_steps and self.config.mode == "residual" and self.latent_denoise:
            step = torch.full((B,), self.inference_steps, device=mu0.device)
            y_hat = state + self._predict(state, torch.ones_like(state, dtype=torch.bool), step, mu0, s0)[2]
        return y_hat, means, scales, state

    def hyper_decode(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_hat -> (mu0, sigma0), fp32; the same in forward and decode. sigma0 comes
        lower-bounded, as the likelihood and the coder's scale table bound it anyway."""
        sigma0, mu0 = self.h_s(z_hat).float().chunk(2, dim=1)
        return mu0, self.gaussian_conditional.lower_bound_scale(sigma0)

    def _bits(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """-log2 of the likelihood of integer residuals ``values`` under zero-mean Gaussians of ``scales``."""
        return -torch.log2(self._y_likelihoods(values, scales, torch.zeros_like(values)))

    def _y_likelihoods(self, values: torch.Tensor, scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        gc = self.gaussian_conditional
        likelihood = gc._likelihood(values, scales, means)
        return gc.likelihood_lower_bound(likelihood) if gc.use_likelihood_bound else likelihood

    # -- geometry --

    def padding(self, height: int, width: int) -> tuple[int, int]:
        m = self.pad_multiple
        return (-height) % m, (-width) % m

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding(*x.shape[-2:])
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def z_shape(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.padding(height, width)
        f = self.latent_factor * HYPER_FACTOR
        return (height + ph) // f, (width + pw) // f

    # -- CompressAI contract --

    def forward(self, x: torch.Tensor, quality: torch.Tensor | float | None = None, latent: bool = False) -> dict:
        """Variable-rate models take ``quality``: one value or one per image, in [1, levels].

        ``latent=True``: ``x`` is the latent y itself ((B, M, h, w), h and w multiples of
        ``pad_multiple // latent_factor``) and only the entropy model runs (h_a, the bottleneck,
        h_s, the chain): training it on frozen transforms, from cached latents. The output then
        has no ``x_hat``."""
        height, width = x.shape[-2:]
        step = self._step_for(quality, x.shape[0], x.device)
        y = x if latent else self.g_a(self._pad(x))
        z = self.h_a(y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z_hat, z_likelihoods = self.entropy_bottleneck(z.float())
        mu0, sigma0 = self.hyper_decode(z_hat)
        y = y.float()
        likelihoods = {"z": z_likelihoods}
        rate_weight = None
        if self.training:
            # the noisy proxy of round((y - mu) / step) * step + mu (drawn in logical order: the same
            # in any memory format)
            noise = torch.rand(y.shape, device=y.device).sub_(0.5)
            y_coded = y + (noise if step is None else noise * step)
            means, scales, residual, rate_weight = self._teacher_forced(y_coded, mu0, sigma0)
            y_hat = y_coded if self.config.mode == "residual" else means
            if self.decoder_ste and self.config.mode == "residual":
                rounded = torch.round(y - means) if step is None else torch.round((y - means) / step) * step
                y_hat = y + (rounded + means - y).detach()
            if residual is not None:
                y_hat = y_hat + residual
        else:
            full_step = None if step is None else step.expand_as(y)

            def quantize(k, selected, means, scales):
                if full_step is None:
                    return self.gaussian_conditional.quantize(y[:, selected], "dequantize", means)
                s = full_step[:, selected]
                return torch.round((y[:, selected] - means) / s) * s + means

            y_hat, means, scales, y_coded = self._run_chain(mu0, sigma0, quantize if self.config.mode == "residual" else _predicted)
        if self.config.mode == "residual":
            with torch.autocast(device_type=x.device.type, enabled=False):
                if step is None:
                    likelihoods["y"] = self._y_likelihoods(y_coded, scales, means)
                else:  # in units of the step: the coder codes round((y - mu) / step) with scale sigma / step
                    likelihoods["y"] = self._y_likelihoods(y_coded / step, self.gaussian_conditional.lower_bound_scale(scales / step), means / step)
                if rate_weight is not None:  # one sampled step: L^w, see _teacher_forced (float64: L^w underflows fp32)
                    likelihoods["y"] = likelihoods["y"].double().pow(rate_weight)
        out = {"y": y, "z": z, "y_hat": y_hat, "prediction": means, "scales": scales, "likelihoods": likelihoods}
        return out if latent else {"x_hat": self.g_s(y_hat)[..., :height, :width]} | out

    def _exact_chain(self, z_hat: torch.Tensor, code_group: Callable, quality_code: int | None = None) -> torch.Tensor:
        """The reverse chain in the integer form, as encoder and decoder both run it.
        ``code_group(k, selected, means, indexes, steps)`` gets group k's integer means and scale
        indexes ((B, n_k) each) and quantization steps ((n_k,), at ``exact.f_latent``) and returns
        its integer symbols. -> y_hat as int64 at ``exact.f_latent``."""
        ex = self.exact
        if ex is None:
            raise RuntimeError("the model has no exact entropy model yet: call update() (or load a converted checkpoint)")
        with torch.autocast(z_hat.device.type, enabled=False):  # float64 is never autocast; made explicit
            return self._exact_steps(ex, z_hat, code_group, quality_code)

    def _exact_steps(self, ex: ExactPrior, z_hat: torch.Tensor, code_group: Callable, quality_code: int | None) -> torch.Tensor:
        mu0, sigma0 = ex.hyper(z_hat, self.h_s)
        log_sigma0 = ex.log(sigma0)
        B, M, h, w = mu0.shape
        residual = self.config.mode == "residual"
        if self.inference_steps and not ex.has_unet:
            raise ExactError("this checkpoint's exact form has no U-Net (it was made before BK-SDM's U-Net had one): "
                             f"convert it ({CONVERT_HINT}), or code with 0 diffusion steps (--diffusion_steps 0)")
        groups = self.reveal_groups(h, w, mu0.device)
        step, log_step = (t[:, None, None].expand(M, h, w) for t in ex.steps(quality_code, M))
        state, cache = mu0.clone(), {}
        for k in range(max(1, self.inference_steps if residual else 1)):
            selected = groups == k
            means, log_scales = mu0, log_sigma0
            if self.inference_steps:
                rows = torch.full((B,), k, device=mu0.device)
                known = (groups < k).expand(B, M, h, w)
                means, log_scales = ex.predict(self.unet, self.adapter, state, known, rows, mu0, sigma0, log_sigma0, cache)
            if residual:
                indexes = ex.indexes(log_scales[:, selected] - log_step[selected])
                symbols = code_group(k, selected, means[:, selected], indexes, step[selected])
                state[:, selected] = symbols.to(state.device) * step[selected] + means[:, selected]
            else:
                state[:, selected] = means[:, selected]
        if self.inference_steps and residual and self.latent_denoise:
            rows = torch.full((B,), self.inference_steps, device=mu0.device)
            everything = torch.ones_like(state, dtype=torch.bool)
            state = state + ex.predict(self.unet, self.adapter, state, everything, rows, mu0, sigma0, log_sigma0, cache, denoise=True)
        return state

    def analyze(self, x: torch.Tensor) -> torch.Tensor:
        """The picture (B, 3, H, W), float in [0, 1] or uint8 (a quarter of the memory; the same
        values once divided by 255) -> the latent y (B, M, h, w), in tiles of ``tile`` pixels when
        g_a is local (the untiled y up to float rounding, memory bounded at any size)."""
        x = self._pad(x)

        def g_a(t):
            return self.g_a(t.float().div_(255) if t.dtype == torch.uint8 else t).float()

        if self.halo_a is None:
            return g_a(x)
        tile = -(-self.tile // self.latent_factor) * self.latent_factor
        return run_tiled(g_a, x, tile, self.halo_a, down=self.latent_factor)

    def synthesize(self, y_hat: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The decoded latent -> the picture (B, 3, height, width) in [0, 1], in tiles of ``tile``
        pixels when g_s is local."""
        if self.halo_s is None:
            return self.g_s(y_hat)[..., :height, :width].clamp(0, 1)
        tile = -(-self.tile // self.latent_factor)
        x_hat = run_tiled(lambda t: self.g_s(t).clamp_(0, 1), y_hat, tile, self.halo_s, up=self.latent_factor)
        return x_hat[..., :height, :width]

    def _latent(self, y_q: torch.Tensor) -> torch.Tensor:
        return (y_q.double() * _pow2(-self.exact.f_latent)).float()

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quality: float | None = None, latents: tuple | None = None) -> dict:
        """-> {"strings": one list per revealed group, then z's; "shape": (H, W); "digests": one
        ``latent_digest`` per image, which the decoder must reach; "y_hat": the decoder's latent}.
        A variable-rate model takes ``quality`` (in [1, levels]; it codes at ``quality_code``'s).
        ``x`` is float in [0, 1], or uint8. ``latents``: the (y, z) to code instead of the analysis
        transforms' (what ``search`` finds); the decoder and the file are the same either way."""
        quality_code = self.quality_code(quality)
        height, width = x.shape[-2:]
        y, z = latents if latents is not None else (self.analyze(x), None)
        z = self.h_a(y) if z is None else z
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        gc, strings = self.gaussian_conditional, []

        def code(k, selected, means, indexes, steps):
            # round((y - mean) / step), all in units of 2**-f_latent (exact in float64; step 2**f: round(y - mean))
            scaled = y[:, selected].double().mul_(_pow2(self.exact.f_latent)).sub_(means)
            symbols = scaled.div_(steps).round_().long()
            del scaled
            strings.append([gc.encode_symbols(s, i) for s, i in zip(symbols, indexes)])
            return symbols

        y_q = self._exact_chain(z_hat, code, quality_code)
        digests = [latent_digest(y_q[b], z_hat[b]) for b in range(len(y_q))]
        return {"strings": [*strings, z_strings], "shape": (height, width), "digests": digests, "y_hat": self._latent(y_q),
                "z_digests": [hyper_digest(z_hat[b]) for b in range(len(z_hat))]}  # fmt: skip

    def rate_weight(self, quality: float | None = None) -> float:
        """The rate weight lambda of loss = D + lambda * bpp the codec was trained for (at
        ``quality``, for a variable-rate one): what ``search`` minimises."""
        if self.config.rate_levels:
            self.quality_code(quality)  # checks it
            return float(self.quality_lambda(torch.tensor([quality]))[0])
        if self.lambda_rate is None:
            raise ValueError("this checkpoint does not record the rate weight it was trained for (made before it was "
                             "stored): code it with --effort 0")  # fmt: skip
        return self.lambda_rate

    @torch.enable_grad()
    def search(self, x: torch.Tensor, iterations: int, quality: float | None = None, lr: float = SEARCH_LR,
               progress: bool = False, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Encoder-side search (after Yang, Bamler & Mandt 2020): from the analysis transforms' y and
        z, ``iterations`` Adam steps (step size ``lr``, falling geometrically to ``lr *
        (SEARCH_LR_STEPS / iterations)**2``) on D + lambda * bpp (``rate_weight``) of this very
        codec, under the annealed rounding of ``soft_round`` (deterministic; its temperature falls
        geometrically over ``SEARCH_TAU``), so that the hard rounding the coder applies is what was
        optimised. The rate is the chain's own: each group's residual under the Gaussian the U-Net
        predicts from the groups before it, charged the expected bits over its two roundings (so
        that a residual halfway between integers costs no less than either), and z's soft-rounded
        value under the bottleneck. The decoder does not change.
        (1, 3, H, W) picture, float in [0, 1] or uint8 -> (y, z) for ``compress(latents=...)``;
        ``y``: the analysis transform's latent of ``x``, where it is computed already."""
        height, width = x.shape[-2:]
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        lam, pixels = self.rate_weight(quality), height * width
        with torch.no_grad():
            y = self.analyze(x) if y is None else y.detach().clone()
            z = self.h_a(y)
        y, z = y.requires_grad_(), z.float().requires_grad_()
        optimizer = torch.optim.Adam([y, z], lr=lr)
        step = self._step_for(quality, 1, x.device)
        step = None if step is None else step.detach()
        eb = self.entropy_bottleneck
        medians = eb._get_medians().detach().view(1, -1, 1, 1)
        trainable = [p for p in self.parameters() if p.requires_grad]
        for p in trainable:  # gradients for y and z only
            p.requires_grad_(False)
        try:
            from tqdm import tqdm

            for t in tqdm(range(iterations), desc="search", unit="step", disable=not progress, leave=False, dynamic_ncols=True):
                done = t / max(1, iterations - 1)  # the fraction of the search behind
                tau = SEARCH_TAU[0] * (SEARCH_TAU[1] / SEARCH_TAU[0]) ** done
                optimizer.param_groups[0]["lr"] = lr * min(1.0, SEARCH_LR_STEPS / iterations) ** (2 * done)
                z_soft = soft_round(z - medians, tau) + medians
                likelihood = eb._likelihood(z_soft.transpose(0, 1).reshape(z.shape[1], 1, -1))[0]
                bits = -torch.log2(eb.likelihood_lower_bound(likelihood) if eb.use_likelihood_bound else likelihood).sum()
                mu0, s0 = self.hyper_decode(z_soft)

                def soft(k, selected, means, scales):
                    nonlocal bits
                    s = 1 if step is None else step.expand_as(y)[:, selected]
                    r, scaled = (y[:, selected] - means) / s, scales / s
                    low = r.detach().floor()
                    p = soft_round(r, tau) - low  # the probability of rounding up
                    bits = bits + ((1 - p) * self._bits(low, scaled) + p * self._bits(low + 1, scaled)).sum()
                    return means + s * (low + p)

                code = soft if self.config.mode == "residual" else _predicted
                y_hat = self._run_chain(mu0, s0, code)[0]
                x_hat = self.g_s(y_hat.contiguous(memory_format=torch.channels_last))  # about 1.3x faster on CPUs
                distortion = (x_hat[..., :height, :width].float() - x).square().mean()
                loss = distortion + lam * bits / pixels
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return y.detach(), z.detach()

    @torch.no_grad()
    def decompress(self, strings: list, shape: tuple[int, int], quality: float | None = None, z_digests: list | None = None,
                   digests: list | None = None) -> dict:  # fmt: skip
        """-> {"x_hat", "y_hat", "digests"}. Pass the encoder's ``digests`` and ``z_digests`` (what
        ``compress`` returns; a file's header carries them): a hyper-latent that differs stops
        decoding before the reverse chain, and a latent that differs (another machine computed other
        entropy parameters, or the strings are damaged) raises ``BitstreamError`` instead of
        returning a picture. Without them nothing is checked (a warning says so). A variable-rate
        model takes the encoder's ``quality``."""
        if digests is None:
            warnings.warn("decompress() without the encoder's digests cannot check the decoded latent: pass "
                          "digests=... (and z_digests=...) from compress()", stacklevel=2)  # fmt: skip
        quality_code = self.quality_code(quality)
        height, width = shape
        if len(strings) != self.num_strings:
            raise ValueError(f"expected {self.num_strings} string lists (one per revealed group, then z), got {len(strings)}")
        z_hat = self.entropy_bottleneck.decompress(strings[-1], self.z_shape(height, width))
        if z_digests is not None and [hyper_digest(z) for z in z_hat] != list(z_digests):
            raise BitstreamError(
                "the decoded hyper-latent differs from the encoder's (hyper-latent checksum mismatch): the header "
                "(its image size, say) or the file is damaged; nothing further was decoded"
            )
        gc = self.gaussian_conditional

        def decode(k, selected, means, indexes, steps):
            return torch.stack([gc.decode_symbols(s, i) for s, i in zip(strings[k], indexes)])

        y_q = self._exact_chain(z_hat, decode, quality_code)
        reached = [latent_digest(y_q[b], z_hat[b]) for b in range(len(y_q))]
        if digests is not None and reached != list(digests):
            raise BitstreamError(
                "the decoded latent differs from the encoder's (latent checksum mismatch): this decoder computed other "
                "entropy parameters than the encoder, or the file is damaged; no image was written"
            )
        y_hat = self._latent(y_q)
        return {"x_hat": self.synthesize(y_hat, height, width), "y_hat": y_hat, "digests": reached}

    @torch.no_grad()
    def calibrate(self, images: Iterable[torch.Tensor]) -> dict[str, float]:
        """Activation ranges for the integer form: the float chain (eval mode, rounding) run on
        ``images`` ((3, H, W) or (B, 3, H, W) training crops, never evaluation images) through the
        integer network's own sequence of operations, each point's largest magnitude recorded.
        Kept in ``calibration``; ``update()`` then chooses the exponents from it."""
        ops, h_s, unet, adapter, was_training = _FloatOps(), self.h_s, self.unet, self.adapter, self.training
        device = h_s[0].weight.device
        self.eval()
        try:
            self.h_s = _RecordingHyper(h_s, ops)
            if unet is not None:
                self.unet = _RecordingUNet(unet, ops)
            if adapter is not None:
                self.adapter = _RecordingAdapter(adapter, ops)
            qualities = range(1, self.config.rate_levels + 1) if self.config.rate_levels else [None]
            for x in images:  # a variable-rate model's ranges: over every trained level
                for quality in qualities:
                    self((x[None] if x.dim() == 3 else x).to(device), quality)
        finally:
            self.h_s, self.unet, self.adapter = h_s, unet, adapter
            self.train(was_training)
        self.calibration = ops.maxima
        return ops.maxima

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """CompressAI's ``update`` with a finer default scale table (``scale_table_levels``).

        ``build_indexes`` rounds every scale up to the next table entry; CompressAI's 64 levels
        are 13% apart and cost about 4% of the latent's bits at ~1 bit per symbol, 256 levels
        (3% apart) about 1%. Building the larger table costs a few milliseconds.
        """
        if scale_table is None:
            scale_table = get_scale_table(levels=self.config.scale_table_levels)
        updated = super().update(scale_table=scale_table, force=force, update_quantiles=update_quantiles)
        self.to_exact()
        return updated

    def to_exact(self) -> None:
        """(Re)build the integer form from the current weights, the calibration and the coder's
        tables (they must exist: ``update()``). Its per-step tables are computed here once, in
        floating point, and a checkpoint stores them: ``load_codec`` recomputes nothing."""
        self.exact = ExactPrior(self, ExactPrior.build(self, self.calibration))

    def exact_state(self) -> dict:
        """What a checkpoint stores of the exact form: the integer model's tables and exponents,
        the coders' CDF tables and the scale table."""
        return {
            "prior": self.exact.state(),
            "entropy_bottleneck": _pack_tables(self.entropy_bottleneck),
            "gaussian_conditional": _pack_tables(self.gaussian_conditional),
            "scale_table": self.gaussian_conditional.scale_table.clone(),
        }

    def load_exact_state(self, state: dict) -> None:
        """Restore a checkpoint's exact form (the inverse of ``exact_state``); the integer weights
        follow from the float ones by exact operations."""
        _unpack_tables(self.entropy_bottleneck, state["entropy_bottleneck"])
        _unpack_tables(self.gaussian_conditional, state["gaussian_conditional"])
        self.gaussian_conditional.scale_table = state["scale_table"].float()
        self.exact = ExactPrior(self, state["prior"])

    @property
    def num_strings(self) -> int:
        """String lists in ``compress``'s output: one per revealed group, then z's."""
        if self.config.mode == "z_only":
            return 1
        return 1 + max(1, self.inference_steps)

    # -- checkpoints --

    def _frozen(self, name: str) -> bool:
        return name.startswith(self.frozen_prefixes) and not name.startswith(self.trained_in_frozen)

    def trainable_state_dict(self) -> dict:
        """The state a checkpoint stores: everything but the frozen pretrained weights."""
        return {k: v for k, v in self.state_dict().items() if not self._frozen(k)}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load a checkpoint's state. Entropy tables it leaves out (``slim_checkpoint``) stay empty
        until ``update(force=True)`` derives them; float tensors stored in fp16 are cast back."""
        own = self.state_dict()
        state = {k: own[k] for k in own if k.endswith(ENTROPY_TABLES) and k not in state} | state
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._frozen(k)]
        if missing or unexpected:
            raise lic_common.CheckpointError(
                "checkpoint does not match the model built from its config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def checkpoint_payload(self) -> dict:
        """What any checkpoint of this codec holds so that ``load_codec`` can rebuild it."""
        payload = {
            "architecture": ARCHITECTURE,
            "codec_format": CODEC_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": self.trainable_state_dict(),
            "calibration": self.calibration,
        }
        return payload | ({"exact": self.exact_state()} if self.exact is not None else {})

    def fingerprint(self) -> bytes:
        """8 bytes identifying the weights and config a bitstream needs (pretrained parts by path).

        The entropy coder's tables are left out: ``update()`` derives them from the weights.
        """
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.trainable_state_dict().items()):
            if name.endswith(ENTROPY_TABLES):
                continue
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        if self.exact is not None:  # the stored tables decide the coder's parameters too
            _hash_nested(h, self.exact_state())
        return h.digest()[:8]


def _hash_nested(h, value) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode())
            _hash_nested(h, value[k])
    elif torch.is_tensor(value):
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(repr(value).encode())


# ---- Factory ----

# With BK-SDM's 1000-step schedule, the chain's timesteps cover its first 20%, where the signal
# still dominates: the pretrained U-Net sees inputs like those it was trained to clean up.
PRETRAINED_DEFAULT_STRENGTH = 0.2


def _load_pretrained(cls, path: str, subfolder: str):
    """A diffusers component from a local folder, the local hub cache, or the hub. Offline, a hub id
    that is not cached fails at once (no minute of retries)."""
    try:
        if Path(path).is_dir():
            return cls.from_pretrained(path, subfolder=subfolder)
        try:
            with warnings.catch_warnings():  # diffusers' deprecation notes from the cache lookup
                warnings.simplefilter("ignore")
                return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True)
        except Exception:
            if not lic_common.hub_reachable():
                raise OSError(f"it is not in the local Hugging Face cache and the hub is not reachable from here") from None
            return cls.from_pretrained(path, subfolder=subfolder)
    except Exception as e:  # hub, file and config errors alike, some with pages of detail
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PretrainedError(
            f"could not load BK-SDM component '{subfolder}' from '{path}' ({first}). "
            "Point --bk_sdm_path at a local diffusers folder (e.g. a download of nota-ai/bk-sdm-small), "
            "or use the from-scratch components (use_pretrained_vae=False, use_pretrained_unet=False)."
        ) from e


def from_config(config: CodecConfig) -> DiffusionHyperprior:
    """Build the model a config describes (pretrained parts loaded from ``config.bk_sdm_path``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    frozen, trained_in_frozen = [], []
    if config.use_pretrained_vae:
        vae = _load_pretrained(AutoencoderKL, config.bk_sdm_path, "vae")
        if config.M != vae.config.latent_channels:
            config = dataclasses.replace(config, M=vae.config.latent_channels)
        analysis = VAEAnalysis(vae, config.latent_gain_init)
        synthesis = VAESynthesis(analysis)
        latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if not config.finetune_pretrained:
            vae.requires_grad_(False)
            frozen.append("g_a.vae.")
    else:
        analysis, synthesis = analysis_transform(config.N, config.M), synthesis_transform(config.N, config.M)
        latent_factor = 16

    unet = adapter = None
    timesteps = SCRATCH_TIMESTEPS
    if config.diffusion_steps > 0 and config.use_pretrained_unet:
        unet = _load_pretrained(UNet2DConditionModel, config.bk_sdm_path, "unet")
        if unet.config.in_channels != config.M or unet.config.out_channels != config.M:
            raise ValueError(
                f"the pretrained U-Net works on {unet.config.in_channels} latent channels but the latent has "
                f"M={config.M}; use the pretrained VAE with it (use_pretrained_vae=True) or set M to match"
            )
        timesteps = _load_pretrained(DDIMScheduler, config.bk_sdm_path, "scheduler").config.num_train_timesteps
        if not config.finetune_pretrained:
            unet.requires_grad_(False)
            frozen.append("unet.")
            trained_in_frozen += ["unet.conv_in.", "unet.conv_out."]
        adapt_pretrained_unet(unet, config.M)  # new layers, trainable
        dim = unet.config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        adapter = CrossAttentionAdapter(2 * config.M, dim, config.adapter_grid)
    elif config.diffusion_steps > 0:
        unet = scratch_unet(config.M, config.unet_channels, config.unet_levels, config.unet_layers_per_block,
                            config.unet_norm_group_channels)
    return DiffusionHyperprior(config, analysis, synthesis, unet, adapter, latent_factor, timesteps,
                               tuple(frozen), tuple(trained_in_frozen))  # fmt: skip


def create_bk_sdm_compression_model(
    bk_sdm_path: str | None = None,
    N: int = 128,
    M: int = 128,
    diffusion_steps: int = 4,
    use_pretrained_vae: bool = False,
    use_pretrained_unet: bool = False,
    **kwargs,
) -> DiffusionHyperprior:
    """The diffusion-hyperprior codec.

    Args:
        bk_sdm_path: a local diffusers folder or a hub id (e.g. ``nota-ai/bk-sdm-small``) holding
            ``vae/``, ``unet/`` and ``scheduler/``; needed only for pretrained components.
        N: channels of the transforms and of z.  M: latent channels (the VAE's when pretrained).
        diffusion_steps: reverse steps of the masked diffusion, each revealing one group of the
            latent (0: the hyper-decoder alone codes it).
        use_pretrained_vae / use_pretrained_unet: BK-SDM components instead of from-scratch ones.
        **kwargs: any other ``CodecConfig`` field: ``reveal`` ("checkerboard": S/2 channel slices
            x 2 checkerboard halves, or "channels": S channel slices), ``latent_denoise`` (a last
            step that removes quantization error; default False: sharing the U-Net, it cost the
            reveal steps their context, see the README), ``mode`` ("residual" or
            "z_only"), ``finetune_pretrained`` (pretrained parts are frozen unless True),
            ``unet_channels``, ``unet_levels``, ``unet_layers_per_block``, ``diffusion_strength``
            (fraction of the U-Net's timestep range the chain covers; default 1.0 from scratch,
            0.2 with BK-SDM's U-Net), ``latent_gain_init``, ``adapter_grid``, ``scale_table_levels``.
    """
    config = CodecConfig(
        N=N,
        M=M,
        diffusion_steps=diffusion_steps,
        use_pretrained_vae=use_pretrained_vae,
        use_pretrained_unet=use_pretrained_unet,
        bk_sdm_path=bk_sdm_path,
        **kwargs,
    )
    return from_config(config)


def create_diffusion_hyperprior_model(N: int = 128, M: int = 128, diffusion_steps: int = 4, **kwargs):
    """The from-scratch codec (no pretrained component), under the name its users already call."""
    return create_bk_sdm_compression_model(None, N=N, M=M, diffusion_steps=diffusion_steps, **kwargs)


def save_random_bk_sdm(folder: str | Path, vae: dict | None = None, unet: dict | None = None, seed: int = 0) -> Path:
    """A diffusers folder laid out like nota-ai/bk-sdm-small (``vae/``, ``unet/``, ``scheduler/``)
    with random weights, for trying the pretrained path where no hub is reachable (tests,
    benchmarks). ``vae`` and ``unet`` are the diffusers configurations (``AutoencoderKL``,
    ``UNet2DConditionModel``); BK-SDM's published U-Net configuration gives its real size."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderKL(**(vae or {})).save_pretrained(folder / "vae")
    UNet2DConditionModel(**(unet or {})).save_pretrained(folder / "unet")
    PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")  # fmt: skip
    return folder


def slim_checkpoint(ckpt: dict, half: bool = True) -> dict:
    """A codec checkpoint to ship: architecture, config and weights only (no optimizer state, no
    entropy tables: ``load_codec`` derives them). With ``half``, a float tensor is stored in fp16
    when that moves no value by more than fp16's epsilon times the tensor's largest magnitude;
    tensors of tiny values (GDN's reparametrised betas) keep fp32. About a third of the size."""
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(ENTROPY_TABLES)}
    state = lic_common.half_where_exact(state) if half else state
    keep = {k: ckpt[k] for k in ("exact", "calibration") if k in ckpt}
    if (lam := recorded_rate_weight(ckpt)) is not None:
        keep["lambda_rate"] = lam
    return {"architecture": ckpt["architecture"], "codec_format": ckpt.get("codec_format", 1), "config": ckpt["config"],
            "state_dict": state} | keep  # fmt: skip


def recorded_rate_weight(ckpt: dict) -> float | None:
    """The rate weight lambda a codec checkpoint was trained for: a shipped checkpoint's
    ``lambda_rate``, or its training run's; None where neither is recorded."""
    if "lambda_rate" in ckpt:
        return float(ckpt["lambda_rate"])
    value = ckpt.get("run_config", {}).get("args", {}).get("lambda_rate")
    return None if value is None else float(value)


CONVERT_HINT = "python bk_sdm_compression.py convert OLD.pth NEW.pth --data TRAINING_IMAGES"


def check_codec_checkpoint(ckpt: dict, path: str | Path, formats: tuple[int, ...] = (CODEC_FORMAT,)) -> None:
    """``CheckpointError`` unless ``ckpt`` holds a codec of one of ``formats`` (weights of format
    2 can start training or be converted; only format 3 codes files)."""
    arch = ckpt.get("architecture")
    if arch != ARCHITECTURE or "config" not in ckpt or "state_dict" not in ckpt:
        what = f"a '{arch}' checkpoint" if arch else "not a checkpoint of train_bk_sdm_compression.py"
        raise lic_common.CheckpointError(f"{path}: {what}; expected a '{ARCHITECTURE}' codec checkpoint")
    found = ckpt.get("codec_format", 1)
    if found == 2 and found not in formats:
        raise lic_common.CheckpointError(
            f"{path}: a codec of format 2, whose floating-point entropy model makes files that do not decode on "
            f"other machines; convert it to the exact integer form of format {CODEC_FORMAT}: {CONVERT_HINT}"
        )
    if found not in formats:
        raise lic_common.CheckpointError(
            f"{path}: a codec of format {found} ({'the Gaussian DDIM prior' if found == 1 else 'unknown'}); this "
            f"version reads format {CODEC_FORMAT} (the masked-diffusion prior, exact). Retrain it, or use the "
            "reference checkpoints in reference_checkpoints/"
        )


def load_codec(
    path: str | Path,
    device: str | torch.device = "cpu",
    bk_sdm_path: str | None = None,
    diffusion_steps: int | None = None,
    ckpt: dict | None = None,
) -> tuple[DiffusionHyperprior, dict]:
    """Rebuild a trained codec from a checkpoint, entropy tables ready, in eval mode.

    ``bk_sdm_path`` overrides where the pretrained parts are loaded from (e.g. a local copy);
    ``diffusion_steps`` overrides the number of reverse steps (0: the hyper-decoder alone);
    ``ckpt``: the checkpoint already read from ``path`` (it is then not read again).
    """
    ckpt = lic_common.load_checkpoint(path) if ckpt is None else ckpt
    check_codec_checkpoint(ckpt, path)
    if "exact" not in ckpt:
        raise lic_common.CheckpointError(
            f"{path}: no exact entropy model in it (a training run's last_checkpoint.pth?): use the run's "
            f"best_checkpoint.pth, or make one: {CONVERT_HINT}"
        )
    model = _rebuild(ckpt, bk_sdm_path)
    model.load_exact_state(ckpt["exact"])
    if diffusion_steps is not None:
        model.set_inference_steps(diffusion_steps)
    return model.to(device).eval(), ckpt


def _rebuild(ckpt: dict, bk_sdm_path: str | None = None) -> DiffusionHyperprior:
    """The model a checkpoint describes, its weights and calibration loaded (no entropy tables)."""
    config = CodecConfig.from_dict(ckpt["config"])
    if bk_sdm_path is not None and (config.use_pretrained_vae or config.use_pretrained_unet):
        config = dataclasses.replace(config, bk_sdm_path=bk_sdm_path)
    model = from_config(config)
    model.load_trainable_state_dict(ckpt["state_dict"])
    model.calibration = ckpt.get("calibration")
    model.lambda_rate = recorded_rate_weight(ckpt)
    return model


def calibration_crops(images: str | Path | list[Path], count: int = 16, size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """``count`` random crops (random downscale, position and flip) of the images in a folder
    (or a list of image files): what ``calibrate`` runs on. Training photographs, never
    evaluation images."""
    paths = images if isinstance(images, list) else lic_common.list_images(images)
    if not paths:
        raise FileNotFoundError(f"no images in {images}")
    g = torch.Generator().manual_seed(seed)
    readable = []
    for p in paths:  # an unreadable file is skipped, as training skips it
        try:
            readable.append(lic_common.load_image(p))
        except lic_common.ImageError:
            continue
        if len(readable) >= count:
            break
    if not readable:
        raise FileNotFoundError(f"no readable images in {images}")
    crops = []
    for i in range(count):
        x = readable[i % len(readable)]
        scale = lic_common.random_scale(g, 0.5, 1.0)
        crop = lic_common.scaled_crop(x, min(size, *x.shape[-2:]), scale, g)
        crops.append(crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop)
    return crops


def convert_checkpoint(src: str | Path, dst: str | Path, data: str | Path, count: int = 16, size: int = 256) -> dict:
    """A float (format 2) or exact (format 3) codec checkpoint -> the exact form, calibrated anew
    on ``count`` training crops of ``data``. Returns the new checkpoint."""
    ckpt = lic_common.load_checkpoint(src)
    check_codec_checkpoint(ckpt, src, formats=(2, CODEC_FORMAT))
    model = _rebuild(ckpt)
    model.calibrate(calibration_crops(data, count, size))
    model.update(force=True)
    out = slim_checkpoint(model.checkpoint_payload())
    lic_common.save_checkpoint(out, dst)
    return out


# ---- Bitstream file ----

MAGIC = b"BKSD"
FORMAT_VERSION = 5  # 1: the Gaussian DDIM prior's files; 2: the float entropy model's; 3: without quality; 4: without flags
_HEADER = struct.Struct(">4sBB8sIIHB8sH4sB")  # magic, version, mode, model id, height, width, steps, strings, latent digest, quality, z digest, flags
_LAYOUTS = {3: struct.Struct(">4sBB8sIIHB8s"), 4: struct.Struct(">4sBB8sIIHB8sH4s"), FORMAT_VERSION: _HEADER}  # older formats, still read
GREY = 1  # flags: the picture is greyscale (coded as three equal channels, decoded to one)
NO_QUALITY = 0xFFFF  # the quality field of a fixed-rate model's file
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """A file that is not a valid bitstream for this codec and checkpoint."""


@dataclass
class Header:
    mode: str
    model_id: bytes
    height: int
    width: int
    diffusion_steps: int
    digest: bytes = bytes(8)  # ``latent_digest`` of the decoded latent
    quality_code: int | None = None  # variable rate: ``DiffusionHyperprior.quality_code`` of the quality coded at
    z_digest: bytes | None = None  # ``hyper_digest`` of the decoded hyper-latent (format 4): checked before y is decoded
    grey: bool = False  # a greyscale picture (format 5)

    @property
    def quality(self) -> float | None:
        return None if self.quality_code is None else 1 + self.quality_code / 2**QUALITY_FRACTION_BITS


def write_bitstream(header: Header, strings: list[bytes]) -> bytes:
    """Header, length-prefixed strings, then a CRC-32 of everything before it."""
    body = _HEADER.pack(
        MAGIC, FORMAT_VERSION, MODES.index(header.mode), header.model_id,
        header.height, header.width, header.diffusion_steps, len(strings), header.digest,
        NO_QUALITY if header.quality_code is None else header.quality_code, header.z_digest or bytes(4),
        GREY if header.grey else 0,
    )  # fmt: skip
    body += b"".join(_LENGTH.pack(len(s)) + s for s in strings)
    return body + _CRC.pack(zlib.crc32(body))


def read_bitstream(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, list[bytes]]:
    """Parse and validate a file; ``BitstreamError`` on anything wrong, before any allocation."""
    if len(data) == 0:
        raise BitstreamError("the file is empty")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a bk_sdm_compression file (wrong magic bytes)")
    version = data[len(MAGIC)] if len(data) > len(MAGIC) else None
    if version not in _LAYOUTS:
        hint = " (made with the float entropy model: encode the image again)" if version == 2 else ""
        raise BitstreamError(f"format version {version} is not supported{hint}; this reader knows 3 to {FORMAT_VERSION}")
    layout = _LAYOUTS[version]
    if len(data) < layout.size + _CRC.size:
        raise BitstreamError(f"the file is truncated ({len(data)} bytes, shorter than the header)")
    (crc,) = _CRC.unpack(data[-_CRC.size :])
    body = data[: -_CRC.size]
    _, version, mode, model_id, height, width, steps, count, digest, *extra = layout.unpack(body[: layout.size])
    quality_code = extra[0] if extra and extra[0] != NO_QUALITY else None
    z_digest = extra[1] if extra else None
    flags = extra[2] if len(extra) > 2 else 0
    if zlib.crc32(body) != crc:
        raise BitstreamError("checksum mismatch: the file is truncated or corrupted")
    if flags & ~GREY:
        raise BitstreamError(f"unknown flags {flags:#04x} in header")
    if mode >= len(MODES):
        raise BitstreamError(f"unknown mode {mode} in header")
    if height == 0 or width == 0 or height * width > max_pixels:
        raise BitstreamError(f"header asks for a {width}x{height} image; the limit is {max_pixels} pixels")
    strings, pos = [], layout.size
    for _ in range(count):
        if pos + _LENGTH.size > len(body):
            raise BitstreamError("the file ends inside a string length")
        (n,) = _LENGTH.unpack(body[pos : pos + _LENGTH.size])
        pos += _LENGTH.size
        if pos + n > len(body):
            raise BitstreamError("the file ends inside a string")
        strings.append(body[pos : pos + n])
        pos += n
    if pos != len(body):
        raise BitstreamError(f"{len(body) - pos} unexpected bytes after the strings")
    return Header(MODES[mode], model_id, height, width, steps, digest, quality_code, z_digest, bool(flags & GREY)), strings


@torch.no_grad()
def encode_image(
    model: DiffusionHyperprior, x: torch.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS, model_id: bytes | None = None,
    quality: float | None = None, reconstruct: bool = False, effort: int = 0, progress: bool = False,
) -> bytes | tuple[bytes, torch.Tensor]:  # fmt: skip
    """One image, float in [0, 1] or uint8, RGB (3, H, W) or greyscale (1, H, W: coded as three
    equal channels, the file says so) -> the bytes of a file (and, with ``reconstruct``, the picture its decoder will
    show). Variable-rate models take ``quality``. Pass ``model_id`` (the model's ``fingerprint()``)
    when coding many images, to hash the weights once.

    ``effort`` > 0 searches the latent (``DiffusionHyperprior.search``, ``EFFORT_ITERATIONS[effort]``
    iterations; up to ``SEARCH_MAX_PIXELS``) and keeps whichever of the searched and the analysis
    transforms' latent has the lower real D + lambda * bpp (real bytes, the decoded picture), so
    a higher effort is never worse; 0 codes the analysis transforms' latent. The decoder is the same."""
    height, width = x.shape[-2:]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"an image is (3, H, W) or (1, H, W), not {tuple(x.shape)}")
    if height * width > max_pixels:
        raise BitstreamError(f"the image has {width}x{height} pixels, over the limit of {max_pixels}")
    if not 0 <= effort < len(EFFORT_ITERATIONS):
        raise ValueError(f"effort is 0 to {len(EFFORT_ITERATIONS) - 1}, not {effort}")
    if effort and height * width > SEARCH_MAX_PIXELS:
        raise ValueError(f"the latent search holds at most {SEARCH_MAX_PIXELS} pixels ({width}x{height} given): code it at effort 0")
    grey = x.shape[0] == 1
    batch = x.expand(3, height, width).unsqueeze(0).to(next(model.parameters()).device)
    model_id = model_id or model.fingerprint()
    y = model.analyze(batch)
    candidates = [(y, None)]
    if effort:
        candidates.append(model.search(batch, EFFORT_ITERATIONS[effort], quality, progress=progress, y=y))
    coded = []  # (bytes, decoded picture or None) of each candidate latent
    for latents in candidates:
        out = model.compress(batch, quality, latents)
        header = Header(model.config.mode, model_id, height, width, model.inference_steps,
                        out["digests"][0], model.quality_code(quality), out["z_digests"][0], grey)  # fmt: skip
        data, x_hat = write_bitstream(header, [s[0] for s in out["strings"]]), None
        if reconstruct or effort:
            x_hat = model.synthesize(out["y_hat"], height, width)[0]
            x_hat = x_hat.mean(0, keepdim=True) if grey else x_hat
        coded.append((data, x_hat))
    if effort:  # the lower real D + lambda * bpp; the first (effort 0's) on a tie
        reference, lam = x.to(batch.device).float() / (255 if x.dtype == torch.uint8 else 1), model.rate_weight(quality)
        coded.sort(key=lambda c: float((c[1] - reference).square().mean()) + lam * 8 * len(c[0]) / (height * width))
    data, x_hat = coded[0]
    return (data, x_hat) if reconstruct else data


@torch.no_grad()
def decode_image(
    model: DiffusionHyperprior, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, model_id: bytes | None = None
) -> torch.Tensor:
    """The bytes of a file -> the image in [0, 1]: (3, H, W), or (1, H, W) for a greyscale one
    (the mean of the decoded channels)."""
    header, strings = read_bitstream(data, max_pixels)
    model_id = model_id or model.fingerprint()
    if header.model_id != model_id:
        raise BitstreamError(
            f"the file was made with another checkpoint (id {header.model_id.hex()}, this one is {model_id.hex()})"
        )
    if header.mode != model.config.mode:
        raise BitstreamError(f"the file's mode {header.mode!r} does not match the checkpoint's")
    if header.diffusion_steps != model.inference_steps:
        raise BitstreamError(
            f"the file was coded with {header.diffusion_steps} diffusion steps; this decoder is set to "
            f"{model.inference_steps} (the step count decides which group each string holds)"
        )
    if len(strings) != model.num_strings:
        raise BitstreamError(f"the file holds {len(strings)} strings; {model.num_strings} expected")
    levels = model.config.rate_levels
    if (header.quality_code is None) != (not levels) or (levels and header.quality > levels):
        raise BitstreamError(
            f"the file was coded {'at one rate' if header.quality_code is None else f'at quality {header.quality:g}'}; "
            f"this checkpoint is {'variable-rate (qualities 1 to %d)' % levels if levels else 'fixed-rate'}"
        )
    z_digests = None if header.z_digest is None else [header.z_digest]
    out = model.decompress([[s] for s in strings], (header.height, header.width), header.quality, z_digests, [header.digest])
    x_hat = out["x_hat"][0]
    return x_hat.mean(0, keepdim=True) if header.grey else x_hat


@dataclass
class TargetResult:
    data: bytes
    quality: float
    value: float  # bytes or PSNR (dB) reached
    met: bool
    encodes: int


TARGETS = ("size", "psnr")


@torch.no_grad()
def encode_to_target(
    model: DiffusionHyperprior, x: torch.Tensor, kind: str, target: float, max_encodes: int = 8,
    tolerance: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, model_id: bytes | None = None,
    effort: int = 0, progress: bool = False,
) -> TargetResult:  # fmt: skip
    """Search a variable-rate model's quality for a file of ``target`` bytes (``kind`` "size":
    within ``tolerance`` x target, default 2%) or a reconstruction of ``target`` dB PSNR ("psnr":
    within ``tolerance`` dB, default 0.1), as ``cwebp -size`` / ``-psnr`` do: both grow with
    quality, so the search brackets the target and interpolates (in log bytes, or in dB) between
    the bracket's ends, at most ``max_encodes`` encodes. Returns the closest file found and
    whether it is within the tolerance (it is not where the target lies outside the range).
    With ``effort`` > 0 the quality is searched at effort 0, the file coded at ``effort`` at the
    quality found, and the target checked again: the searched file is kept if it meets the target
    or comes closer to it than the effort-0 one (``encodes`` counts it)."""
    levels = model.config.rate_levels
    if not levels:
        raise ValueError("a target size or PSNR needs a variable-rate checkpoint (this one codes at one rate)")
    if kind not in TARGETS:
        raise ValueError(f"kind must be one of {TARGETS}")
    tolerance = (0.02 if kind == "size" else 0.1) if tolerance is None else tolerance
    model_id = model_id or model.fingerprint()
    reference = (x.float() / 255 if x.dtype == torch.uint8 else x).unsqueeze(0)

    def measure(quality: float, effort: int = 0) -> tuple[float, bytes]:
        data, x_hat = encode_image(model, x, max_pixels, model_id, quality, reconstruct=True, effort=effort, progress=progress)
        value = float(len(data)) if kind == "size" else lic_common.psnr(reference, x_hat.cpu()[None])
        return value, data

    def within(value: float) -> bool:
        return abs(value - target) <= (tolerance * target if kind == "size" else tolerance)

    f = math.log if kind == "size" else (lambda v: v)
    lo, hi = [1.0, None], [float(levels), None]  # quality, value at it (measured or not)
    quality, tried = (1 + levels) / 2, []
    for _ in range(max_encodes):
        quality = model.recorded_quality(quality)
        value, data = measure(quality)
        tried.append((abs(value - target), quality, value, data))
        if within(value):
            break
        bound = lo if value < target else hi
        bound[:] = [quality, value]
        if (value < target and quality >= levels) or (value > target and quality <= 1):
            break  # the target is outside what this checkpoint reaches
        if lo[1] is not None and hi[1] is not None:  # interpolate, keeping clear of the bracket's ends
            t = (f(target) - f(lo[1])) / (f(hi[1]) - f(lo[1]))
            quality = lo[0] + min(max(t, 0.1), 0.9) * (hi[0] - lo[0])
        else:  # the other end of the range, unmeasured yet: it closes the bracket or shows the target outside
            quality = hi[0] if hi[1] is None else lo[0]
        if hi[0] - lo[0] < 2**-QUALITY_FRACTION_BITS:
            break
    _, quality, value, data = min(tried, key=lambda t: t[0])
    encodes = len(tried)
    if effort:
        searched_value, searched = measure(quality, effort)
        encodes += 1
        if within(searched_value) or abs(searched_value - target) < abs(value - target):
            value, data = searched_value, searched
    return TargetResult(data, quality, value, within(value), encodes)


# ---- Command line ----


def _jobs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(input, output) of every file the command codes."""
    if args.output_dir is None:
        return [(args.paths[0], Path(args.paths[1]))]
    return [(p, Path(args.output_dir) / (Path(p).stem + SUFFIXES[args.command])) for p in args.paths]


def _run_each(args: argparse.Namespace, code_one: Callable) -> dict:
    """``code_one(src, dst, load) -> result`` for every job; ``load()`` -> (the model, its
    fingerprint), made once. One input: its result; the model loads when the input has been read
    (a bad input fails first), and any error ends the command. Several: the model loads first (a bad
    checkpoint is one error), a progress bar, a bad input is named in one line and the others are
    still coded; the command fails at the end if any did."""
    loaded = []

    def load() -> tuple[DiffusionHyperprior, bytes]:
        if not loaded:
            steps = args.diffusion_steps if args.command == "compress" else None  # decompress: each file's
            model, _ = load_codec(args.checkpoint, args.device, args.bk_sdm_path, steps)
            model.tile = args.tile
            loaded.append((model, model.fingerprint()))
        return loaded[0]

    jobs = _jobs(args)
    if len(jobs) == 1:
        return code_one(*jobs[0], load)
    from tqdm import tqdm

    load()
    results, failed = [], []
    for src, dst in tqdm(jobs, desc=args.command, unit="file", disable=not args.progress, dynamic_ncols=True):
        try:
            results.append({"input": src, "output": str(dst)} | code_one(src, dst, load))
        except (ValueError, lic_common.ImageError, FileNotFoundError, ExactError) as e:
            _say(f"error: {src}: {e}", sys.stderr)
            failed.append(src)
    if failed:
        raise BatchError(f"{len(failed)} of {len(jobs)} inputs could not be coded (named above); the other {len(results)} were written")
    return {"files": results}


class BatchError(ValueError):
    """Some inputs of a batch failed (each already named); the others were coded."""


def _say(line: str, file=None) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=file)  # above a progress bar, if there is one


def run_compress(args: argparse.Namespace) -> dict:
    def code_one(src: str, dst: Path, load: Callable) -> dict:
        x, mode = lic_common.read_image(src, keep_8bit=True)  # a missing or broken image fails before the model loads
        for note in mode.notes:
            _say(f"note: {src}: {note}", sys.stderr)
        x = x[:1] if mode.grey else x
        height, width = x.shape[-2:]
        model, model_id = load()
        target = (("size", args.target_size) if args.target_size else ("size", args.target_bpp * height * width / 8) if args.target_bpp
                  else ("psnr", args.target_psnr) if args.target_psnr else None)  # fmt: skip
        levels = model.config.rate_levels
        if levels and target is None and args.quality is None:
            raise ValueError(f"this checkpoint is variable-rate: give --quality (1 to {levels}) or a --target_bpp / --target_size / --target_psnr")
        effort = args.effort
        if effort and height * width > SEARCH_MAX_PIXELS:
            effort = 0
            _say(f"note: {src}: {width}x{height} is over the latent search's {SEARCH_MAX_PIXELS} pixels: coded at effort 0", sys.stderr)
        if effort and model.lambda_rate is None and not levels:
            effort = 0
            _say(f"note: {src}: the checkpoint does not record the rate weight it was trained for: coded at effort 0", sys.stderr)
        progress = args.progress and len(_jobs(args)) == 1  # several files: one bar over the files
        start = time.perf_counter()
        found = None
        if target is None:
            data = encode_image(model, x, args.max_pixels, model_id, quality=args.quality, effort=effort, progress=progress)
        else:
            found = encode_to_target(model, x, *target, max_encodes=args.max_encodes, max_pixels=args.max_pixels,
                                     model_id=model_id, effort=effort, progress=progress)  # fmt: skip
            data = found.data
        seconds = time.perf_counter() - start
        lic_common.write_bytes_atomic(dst, data)
        result = {"bytes": len(data), "bpp": 8 * len(data) / (height * width), "encode_seconds": seconds, "effort": effort}
        quality = found.quality if found else args.quality
        if quality is not None:
            quality = model.recorded_quality(quality)
        note = "" if quality is None else f", quality {quality:g}"
        if found:
            result |= {"quality": found.quality, "target_met": found.met, "encodes": found.encodes}
            asked = f"{target[1]:.0f} bytes" if target[0] == "size" else f"{target[1]:g} dB"
            reached = f"{found.value:.0f} bytes" if target[0] == "size" else f"{found.value:.2f} dB"
            note += f" ({'reached' if found.met else 'closest this checkpoint reaches to'} {asked}: {reached}, {found.encodes} encodes)"
        grey = ", greyscale" if mode.grey else ""
        _say(f"{src} ({width}x{height}{grey}) -> {dst}: {len(data)} bytes, {result['bpp']:.4f} bpp{note}, effort {effort}, {seconds:.2f} s")
        return result | ({"quality": quality} if quality is not None else {})

    return _run_each(args, code_one)


def run_decompress(args: argparse.Namespace) -> dict:
    def code_one(src: str, dst: Path, load: Callable) -> dict:
        data = Path(src).read_bytes()
        header, _ = read_bitstream(data, args.max_pixels)  # a bad file fails before the model is built
        steps = header.diffusion_steps if args.diffusion_steps is None else args.diffusion_steps
        model, model_id = load()
        if steps != model.inference_steps:
            try:
                model.set_inference_steps(steps)
            except ValueError as e:
                raise BitstreamError(f"the file was coded with {steps} diffusion steps, which this checkpoint cannot decode: {e}") from None
        start = time.perf_counter()
        x_hat = decode_image(model, data, args.max_pixels, model_id)
        seconds = time.perf_counter() - start
        lic_common.save_image(x_hat, dst)
        height, width = x_hat.shape[-2:]
        note = ("" if header.quality is None else f", quality {header.quality:g}") + (", greyscale" if header.grey else "")
        _say(f"{src} -> {dst} ({width}x{height}{note}), {seconds:.2f} s")
        return {"height": height, "width": width, "decode_seconds": seconds, "quality": header.quality, "grey": header.grey}

    return _run_each(args, code_one)


def run_convert(args: argparse.Namespace) -> dict:
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"no checkpoint at {args.input}")
    ckpt = convert_checkpoint(args.input, args.output, args.data, args.crops, args.crop_size)
    print(f"{args.input} -> {args.output}: exact integer form (format {CODEC_FORMAT}), "
          f"calibrated on {args.crops} crops of {args.data}")  # fmt: skip
    return {"exponents": ckpt["exact"]["prior"]["exponents"]}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    run = {"compress": run_compress, "decompress": run_decompress, "convert": run_convert}[args.command]
    try:
        return run(args)
    except (ValueError, lic_common.CheckpointError, lic_common.ImageError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

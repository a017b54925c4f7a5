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

Images of any size are padded (replicating the border) to a multiple of the model's total
downsampling factor and cropped back after decoding.

Command line (a checkpoint written by ``train_bk_sdm_compression.py``):
    python bk_sdm_compression.py compress IMAGE OUT.bin --checkpoint CKPT
    python bk_sdm_compression.py decompress OUT.bin OUT.png --checkpoint CKPT
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lic_common  # isort: skip  (before CompressAI: it imports it without a FutureWarning)
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import conv, deconv
from diffusers import UNet2DModel

# ---- Configuration ----

ARCHITECTURE = "diffusion-hyperprior"
CODEC_FORMAT = 2  # 1: the Gaussian DDIM prior of before; its checkpoints are refused with a message
ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")  # derived by update()
MODES = ("residual", "z_only")
REVEALS = ("checkerboard", "channels")
HYPER_FACTOR = 4  # h_a downsamples the latent twice by 2
SCRATCH_TIMESTEPS = 1000  # the from-scratch U-Net's timestep range, as a diffusers schedule's


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


def scratch_unet(M: int, channels: int, levels: int, layers_per_block: int, norm_group_channels: int) -> UNet2DModel:
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


# ---- The model ----


def _predicted(k: int, selected: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``_run_chain``'s ``code_group`` for mode z_only: nothing is coded, the group takes its means."""
    return means


class DiffusionHyperprior(CompressionModel):
    """The codec. Build it with ``create_bk_sdm_compression_model`` or ``from_config``.

    ``forward(x)`` -> {"x_hat", "y", "z", "y_hat", "prediction", "scales", "likelihoods": {"y"?, "z"}};
    ``compress(x)`` -> {"strings", "shape"}: one string list per revealed group, then z's, with
    ``shape`` the image's (H, W); ``decompress(strings, shape)`` -> {"x_hat", "y_hat"}.
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

    def forward(self, x: torch.Tensor) -> dict:
        height, width = x.shape[-2:]
        y = self.g_a(self._pad(x))
        z = self.h_a(y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z_hat, z_likelihoods = self.entropy_bottleneck(z.float())
        mu0, sigma0 = self.hyper_decode(z_hat)
        y = y.float()
        likelihoods = {"z": z_likelihoods}
        rate_weight = None
        if self.training:
            # the noisy proxy of round(y - mu) + mu (drawn in logical order: the same in any memory format)
            y_coded = y + torch.rand(y.shape, device=y.device).sub_(0.5)
            means, scales, residual, rate_weight = self._teacher_forced(y_coded, mu0, sigma0)
            y_hat = y_coded if self.config.mode == "residual" else means
            if self.decoder_ste and self.config.mode == "residual":
                y_hat = y + (torch.round(y - means) + means - y).detach()
            if residual is not None:
                y_hat = y_hat + residual
        else:
            def quantize(k, selected, means, scales):
                return self.gaussian_conditional.quantize(y[:, selected], "dequantize", means)

            y_hat, means, scales, y_coded = self._run_chain(mu0, sigma0, quantize if self.config.mode == "residual" else _predicted)
        if self.config.mode == "residual":
            with torch.autocast(device_type=x.device.type, enabled=False):
                likelihoods["y"] = self._y_likelihoods(y_coded, scales, means)
                if rate_weight is not None:  # one sampled step: L^w, see _teacher_forced (float64: L^w underflows fp32)
                    likelihoods["y"] = likelihoods["y"].double().pow(rate_weight)
        x_hat = self.g_s(y_hat)[..., :height, :width]
        return {"x_hat": x_hat, "y": y, "z": z, "y_hat": y_hat, "prediction": means, "scales": scales, "likelihoods": likelihoods}

    def compress(self, x: torch.Tensor) -> dict:
        height, width = x.shape[-2:]
        y = self.g_a(self._pad(x)).float()
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        mu0, sigma0 = self.hyper_decode(z_hat)
        strings = []
        if self.config.mode == "residual":
            gc = self.gaussian_conditional

            def code(k, selected, means, scales):
                values = y[:, selected]
                strings.append(gc.compress(values, gc.build_indexes(scales), means=means))
                return gc.quantize(values, "dequantize", means)

            self._run_chain(mu0, sigma0, code)
        return {"strings": [*strings, z_strings], "shape": (height, width)}

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        height, width = shape
        if len(strings) != self.num_strings:
            raise ValueError(f"expected {self.num_strings} string lists (one per revealed group, then z), got {len(strings)}")
        z_hat = self.entropy_bottleneck.decompress(strings[-1], self.z_shape(height, width))
        mu0, sigma0 = self.hyper_decode(z_hat)
        gc = self.gaussian_conditional

        def decode(k, selected, means, scales):
            return gc.decompress(strings[k], gc.build_indexes(scales), mu0.dtype, means=means)

        y_hat = self._run_chain(mu0, sigma0, decode if self.config.mode == "residual" else _predicted)[0]
        x_hat = self.g_s(y_hat)[..., :height, :width].clamp(0, 1)
        return {"x_hat": x_hat, "y_hat": y_hat}

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """CompressAI's ``update`` with a finer default scale table (``scale_table_levels``).

        ``build_indexes`` rounds every scale up to the next table entry; CompressAI's 64 levels
        are 13% apart and cost about 4% of the latent's bits at ~1 bit per symbol, 256 levels
        (3% apart) about 1%. Building the larger table costs a few milliseconds.
        """
        if scale_table is None:
            scale_table = get_scale_table(levels=self.config.scale_table_levels)
        return super().update(scale_table=scale_table, force=force, update_quantiles=update_quantiles)

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
        return {
            "architecture": ARCHITECTURE,
            "codec_format": CODEC_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": self.trainable_state_dict(),
        }

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
        return h.digest()[:8]


# ---- Factory ----

# With BK-SDM's 1000-step schedule, the chain's timesteps cover its first 20%, where the signal
# still dominates: the pretrained U-Net sees inputs like those it was trained to clean up.
PRETRAINED_DEFAULT_STRENGTH = 0.2


def _load_pretrained(cls, path: str, subfolder: str):
    try:
        return cls.from_pretrained(path, subfolder=subfolder)
    except Exception as e:  # hub, file and config errors alike
        raise RuntimeError(
            f"could not load BK-SDM component '{subfolder}' from '{path}': {e}\n"
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


def slim_checkpoint(ckpt: dict, half: bool = True) -> dict:
    """A codec checkpoint to ship: architecture, config and weights only (no optimizer state, no
    entropy tables: ``load_codec`` derives them). With ``half``, a float tensor is stored in fp16
    when that moves no value by more than fp16's epsilon times the tensor's largest magnitude;
    tensors of tiny values (GDN's reparametrised betas) keep fp32. About a third of the size."""
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(ENTROPY_TABLES)}
    state = lic_common.half_where_exact(state) if half else state
    return {"architecture": ckpt["architecture"], "codec_format": ckpt.get("codec_format", 1), "config": ckpt["config"],
            "state_dict": state}  # fmt: skip


def check_codec_checkpoint(ckpt: dict, path: str | Path) -> None:
    """``CheckpointError`` unless ``ckpt`` holds a codec this version can rebuild."""
    arch = ckpt.get("architecture")
    if arch != ARCHITECTURE or "config" not in ckpt or "state_dict" not in ckpt:
        what = f"a '{arch}' checkpoint" if arch else "not a checkpoint of train_bk_sdm_compression.py"
        raise lic_common.CheckpointError(f"{path}: {what}; expected a '{ARCHITECTURE}' codec checkpoint")
    found = ckpt.get("codec_format", 1)
    if found != CODEC_FORMAT:
        raise lic_common.CheckpointError(
            f"{path}: a codec of format {found} ({'the Gaussian DDIM prior' if found == 1 else 'unknown'}); this "
            f"version reads format {CODEC_FORMAT} (the masked-diffusion prior). Retrain it, or use the "
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
    config = CodecConfig.from_dict(ckpt["config"])
    if bk_sdm_path is not None and (config.use_pretrained_vae or config.use_pretrained_unet):
        config = dataclasses.replace(config, bk_sdm_path=bk_sdm_path)
    model = from_config(config)
    model.load_trainable_state_dict(ckpt["state_dict"])
    if diffusion_steps is not None:
        model.set_inference_steps(diffusion_steps)
    model.update(force=True)
    return model.to(device).eval(), ckpt


# ---- Bitstream file ----

MAGIC = b"BKSD"
FORMAT_VERSION = 2  # 1: the Gaussian DDIM prior's files
_HEADER = struct.Struct(">4sBB8sIIHB")  # magic, version, mode, model id, height, width, steps, strings
_LENGTH = struct.Struct(">I")
_CRC = struct.Struct(">I")
DEFAULT_MAX_PIXELS = 2**26


class BitstreamError(ValueError):
    """A file that is not a valid bitstream for this codec and checkpoint."""


@dataclass
class Header:
    mode: str
    model_id: bytes
    height: int
    width: int
    diffusion_steps: int


def write_bitstream(header: Header, strings: list[bytes]) -> bytes:
    """Header, length-prefixed strings, then a CRC-32 of everything before it."""
    body = _HEADER.pack(
        MAGIC, FORMAT_VERSION, MODES.index(header.mode), header.model_id,
        header.height, header.width, header.diffusion_steps, len(strings),
    )  # fmt: skip
    body += b"".join(_LENGTH.pack(len(s)) + s for s in strings)
    return body + _CRC.pack(zlib.crc32(body))


def read_bitstream(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, list[bytes]]:
    """Parse and validate a file; ``BitstreamError`` on anything wrong, before any allocation."""
    if len(data) == 0:
        raise BitstreamError("the file is empty")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a bk_sdm_compression file (wrong magic bytes)")
    if len(data) < _HEADER.size + _CRC.size:
        raise BitstreamError(f"the file is truncated ({len(data)} bytes, shorter than the header)")
    (crc,) = _CRC.unpack(data[-_CRC.size :])
    body = data[: -_CRC.size]
    _, version, mode, model_id, height, width, steps, count = _HEADER.unpack(body[: _HEADER.size])
    if version != FORMAT_VERSION:
        raise BitstreamError(f"format version {version} is not supported (this reader knows {FORMAT_VERSION})")
    if zlib.crc32(body) != crc:
        raise BitstreamError("checksum mismatch: the file is truncated or corrupted")
    if mode >= len(MODES):
        raise BitstreamError(f"unknown mode {mode} in header")
    if height == 0 or width == 0 or height * width > max_pixels:
        raise BitstreamError(f"header asks for a {width}x{height} image; the limit is {max_pixels} pixels")
    strings, pos = [], _HEADER.size
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
    return Header(MODES[mode], model_id, height, width, steps), strings


@torch.no_grad()
def encode_image(
    model: DiffusionHyperprior, x: torch.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS, model_id: bytes | None = None
) -> bytes:
    """One image (3, H, W) in [0, 1] -> the bytes of a file. Pass ``model_id`` (the model's
    ``fingerprint()``) when coding many images, to hash the weights once."""
    height, width = x.shape[-2:]
    if height * width > max_pixels:
        raise BitstreamError(f"the image has {width}x{height} pixels, over the limit of {max_pixels}")
    out = model.compress(x.unsqueeze(0).to(next(model.parameters()).device))
    header = Header(model.config.mode, model_id or model.fingerprint(), height, width, model.inference_steps)
    return write_bitstream(header, [s[0] for s in out["strings"]])


@torch.no_grad()
def decode_image(
    model: DiffusionHyperprior, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, model_id: bytes | None = None
) -> torch.Tensor:
    """The bytes of a file -> the image (3, H, W) in [0, 1]."""
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
    return model.decompress([[s] for s in strings], (header.height, header.width))["x_hat"][0]


# ---- Command line ----


def parse_args(argv: list[str]) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("compress", "image file -> compressed file"), ("decompress", "compressed file -> PNG")):
        p = sub.add_parser(name, help=help_text, formatter_class=fmt)
        p.add_argument("input", help="image to compress" if name == "compress" else "compressed file")
        p.add_argument("output", help="compressed file to write" if name == "compress" else "PNG to write")
        p.add_argument("--checkpoint", required=True, help="codec checkpoint from train_bk_sdm_compression.py")
        p.add_argument("--device", default="cpu", help="torch device (decode on the device that encoded)")
        p.add_argument("--bk_sdm_path", default=None, help="where the pretrained BK-SDM parts are, if not where the checkpoint says")
        p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image (pixels) accepted")
        p.add_argument("--diffusion_steps", type=int, default=None,
                       help="reverse steps, the checkpoint's or 0 (default: the checkpoint's to compress, the file's to decompress)")
    return parser.parse_args(argv)


def run_compress(args: argparse.Namespace) -> dict:
    model, _ = load_codec(args.checkpoint, args.device, args.bk_sdm_path, args.diffusion_steps)
    x = lic_common.load_image(args.input)
    start = time.perf_counter()
    data = encode_image(model, x, args.max_pixels)
    seconds = time.perf_counter() - start
    Path(args.output).write_bytes(data)
    height, width = x.shape[-2:]
    result = {"bytes": len(data), "bpp": 8 * len(data) / (height * width), "encode_seconds": seconds}
    print(f"{args.input} ({width}x{height}) -> {args.output}: {len(data)} bytes, {result['bpp']:.4f} bpp, {seconds:.2f} s")
    return result


def run_decompress(args: argparse.Namespace) -> dict:
    data = Path(args.input).read_bytes()
    header, _ = read_bitstream(data, args.max_pixels)  # a bad file fails before the model is built
    steps = header.diffusion_steps if args.diffusion_steps is None else args.diffusion_steps
    model, _ = load_codec(args.checkpoint, args.device, args.bk_sdm_path)
    if steps != model.inference_steps:
        try:
            model.set_inference_steps(steps)
        except ValueError as e:
            raise BitstreamError(f"the file was coded with {steps} diffusion steps, which this checkpoint cannot decode: {e}") from None
    start = time.perf_counter()
    x_hat = decode_image(model, data, args.max_pixels)
    seconds = time.perf_counter() - start
    lic_common.save_image(x_hat, args.output)
    height, width = x_hat.shape[-2:]
    print(f"{args.input} -> {args.output} ({width}x{height}), {seconds:.2f} s")
    return {"height": height, "width": width, "decode_seconds": seconds}


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        return run_compress(args) if args.command == "compress" else run_decompress(args)
    except (ValueError, lic_common.CheckpointError, lic_common.ImageError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

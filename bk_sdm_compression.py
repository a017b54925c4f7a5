"""Diffusion-hyperprior image codec, with BK-SDM or from-scratch components.

A learned image codec in the scale-hyperprior family (Ballé et al. 2018, "Variational image
compression with a scale hyperprior"; Minnen et al. 2018, "Joint autoregressive and hierarchical
priors") in which the mean of the latent's entropy model is predicted by a denoising diffusion
U-Net (DDIM, Song et al. 2021) that starts from the hyper-decoder's output. The better the
prediction, the fewer bits the residual costs: the diffusion does the entropy estimation.

    x (B, 3, H, W) in [0, 1]
      -> analysis                 y       (B, M, H/s, W/s)   s = 16 (g_a) or the VAE's factor
      -> h_a                      z       (B, N, H/4s, W/4s)
      -> EntropyBottleneck        z_hat   (coded first)
      -> h_s                      scales, mu0   (B, M, H/s, W/s) each
      -> diffusion U-Net, `diffusion_steps` deterministic DDIM steps from mu0,
         conditioned on [mu0, scales]                          prediction (B, M, H/s, W/s)
      -> GaussianConditional(scales, means=prediction) codes round(y - prediction)
      -> y_hat = round(y - prediction) + prediction            (mode "residual")
         y_hat = prediction                                    (mode "z_only": nothing but z coded)
      -> synthesis                x_hat   (B, 3, H, W)

Analysis / synthesis are CompressAI-style convolutions with GDN (N channels, M latent channels),
or the pretrained BK-SDM VAE (diffusers ``AutoencoderKL``; nota-ai/bk-sdm-small is a distilled
Stable Diffusion) behind a learned per-channel quantization step. The U-Net is a small diffusers
``UNet2DModel`` trained from scratch (the hyperprior is concatenated to its input), or BK-SDM's
pretrained ``UNet2DConditionModel`` conditioned through an adapter that turns hyperprior features
into its cross-attention tokens in place of text.

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import conv, deconv
from compressai.ops import quantize_ste
from diffusers import DDIMScheduler, UNet2DModel

import lic_common

# ---- Configuration ----

ARCHITECTURE = "diffusion-hyperprior"
ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")  # derived by update()
MODES = ("residual", "z_only")
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
HYPER_FACTOR = 4  # h_a downsamples the latent twice by 2


@dataclass
class CodecConfig:
    """Everything needed to rebuild the model; stored in every checkpoint.

    Pretrained weights are not stored: ``bk_sdm_path`` says where they come from.
    """

    N: int = 128
    M: int = 128
    diffusion_steps: int = 30
    mode: str = "residual"
    noise_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    use_pretrained_vae: bool = False
    use_pretrained_unet: bool = False
    bk_sdm_path: str | None = None
    finetune_pretrained: bool = False
    unet_channels: int = 64
    unet_levels: int = 2
    unet_layers_per_block: int = 1
    diffusion_strength: float | None = None
    latent_gain_init: float = 4.0
    adapter_grid: int = 8
    scale_table_levels: int = 256

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {tuple(NOISE_SCHEDULES)}, got {self.noise_schedule!r}")
        if self.diffusion_steps < 0:
            raise ValueError(f"diffusion_steps must be >= 0, got {self.diffusion_steps}")
        if self.diffusion_strength is not None and not 0.0 < self.diffusion_strength <= 1.0:
            raise ValueError(f"diffusion_strength must be in (0, 1], got {self.diffusion_strength}")
        if (self.use_pretrained_vae or self.use_pretrained_unet) and not self.bk_sdm_path:
            raise ValueError("pretrained components need bk_sdm_path (a diffusers folder or a hub id)")

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


def _group_count(channels: int, preferred: int = 32) -> int:
    """The largest GroupNorm group count <= ``preferred`` that divides ``channels``."""
    return math.gcd(channels, preferred)


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
    """h_a, (B,M,h,w) -> (B,N,h/4,w/4). It sees y itself, not |y|: the hyperprior carries the
    mean as well as the scale, because its output is where the diffusion starts."""
    return nn.Sequential(
        conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
        conv(N, N, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        conv(N, N, stride=2, kernel_size=5),
    )  # fmt: skip


def hyper_synthesis(N: int, M: int) -> nn.Sequential:
    """h_s, (B,N,h/4,w/4) -> (B,2M,h,w): scales and mu0 (the diffusion's initial latent)."""
    return nn.Sequential(
        deconv(N, N, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        deconv(N, N * 3 // 2, stride=2, kernel_size=5), nn.LeakyReLU(inplace=True),
        conv(N * 3 // 2, 2 * M, stride=1, kernel_size=3),
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


def scratch_unet(M: int, channels: int, levels: int, layers_per_block: int) -> UNet2DModel:
    """A small diffusers U-Net that predicts the noise in y_t given [y_t, mu0, scales]."""
    widths = tuple(channels * 2**i for i in range(levels))
    return UNet2DModel(
        in_channels=3 * M,
        out_channels=M,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=layers_per_block,
        norm_num_groups=_group_count(channels),
        add_attention=False,
    )


# ---- The model ----


class DiffusionHyperprior(CompressionModel):
    """The codec. Build it with ``create_bk_sdm_compression_model`` or ``from_config``.

    ``forward(x)`` -> {"x_hat", "y", "z", "y_hat", "prediction", "likelihoods": {"y"?, "z"},
    "denoising_loss"}; ``compress(x)`` -> {"strings", "shape"} with ``shape`` the image's (H, W);
    ``decompress(strings, shape)`` -> {"x_hat", "y_hat"}.
    """

    def __init__(
        self,
        config: CodecConfig,
        analysis: nn.Module,
        synthesis: nn.Module,
        unet: nn.Module | None,
        scheduler: DDIMScheduler | None,
        adapter: nn.Module | None,
        latent_factor: int,
        frozen_prefixes: tuple[str, ...] = (),
    ):
        super().__init__()
        self.config = config
        N, M = config.N, config.M
        self.g_a = analysis
        self.g_s = synthesis
        self.h_a = hyper_analysis(N, M)
        self.h_s = hyper_synthesis(N, M)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = FastGaussianConditional(None)
        self.unet = unet
        self.adapter = adapter
        self.scheduler = scheduler
        self.frozen_prefixes = frozen_prefixes
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1) if unet is not None else 1
        self.pad_multiple = latent_factor * max(HYPER_FACTOR, unet_factor)
        self.latent_factor = latent_factor
        self.set_inference_steps(config.diffusion_steps)

    # -- the diffusion prediction --

    def set_inference_steps(self, steps: int) -> None:
        """Run ``steps`` DDIM steps when predicting y (0: the hyper-decoder's mu0 alone).

        Encoder and decoder must use the same count; the file header records it.
        """
        if steps < 0:
            raise ValueError(f"diffusion steps must be >= 0, got {steps}")
        if steps > 0 and self.unet is None:
            raise ValueError("this model was built with diffusion_steps=0 and has no U-Net")
        self.inference_steps = steps
        if steps == 0:
            self.timesteps = torch.zeros(0, dtype=torch.long)
            return
        self.scheduler.set_timesteps(steps)
        strength = self.config.diffusion_strength
        if strength is None:  # see create_bk_sdm_compression_model
            strength = PRETRAINED_DEFAULT_STRENGTH if self.config.use_pretrained_unet else 1.0
        keep = max(1, round(steps * strength))
        self.timesteps = self.scheduler.timesteps[-keep:].clone()

    def _predict_noise(self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return self.unet(torch.cat([sample, cond], dim=1), t).sample
        return self.unet(sample, t, encoder_hidden_states=self.adapter(cond)).sample

    def predict_latent(self, mu0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from mu0 down to t = 0; the result predicts y."""
        sample = mu0
        for t in self.timesteps:
            tt = t.expand(sample.shape[0]).to(sample.device)
            eps = self._predict_noise(sample, tt, cond)
            sample = self.scheduler.step(eps.float(), int(t), sample.float(), eta=0.0).prev_sample
        return sample

    def denoising_loss(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The DDPM objective: predict the noise added to y at a random timestep of the part of
        the schedule the chain runs through, given the hyperprior."""
        if self.unet is None or len(self.timesteps) == 0:
            return y.new_zeros(())
        t_max = int(self.timesteps[0]) + 1
        t = torch.randint(0, t_max, (y.shape[0],), device=y.device)
        noise = torch.randn_like(y)
        noisy = self.scheduler.add_noise(y, noise, t).to(y.dtype)
        return F.mse_loss(self._predict_noise(noisy, t, cond).float(), noise.float())

    def hyper_decode(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_hat -> (scales, prediction of y, U-Net condition); the same in forward and decode."""
        scales, mu0 = self.h_s(z_hat).chunk(2, dim=1)
        cond = torch.cat([mu0, scales], dim=1)
        return scales, self.predict_latent(mu0, cond), cond

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
        scales, prediction, cond = self.hyper_decode(z_hat)
        likelihoods = {"z": z_likelihoods}
        if self.config.mode == "residual":
            with torch.autocast(device_type=x.device.type, enabled=False):
                _, likelihoods["y"] = self.gaussian_conditional(y.float(), scales.float(), means=prediction.float())
            y_hat = quantize_ste(y - prediction) + prediction
        else:
            y_hat = prediction
        x_hat = self.g_s(y_hat)[..., :height, :width]
        # The denoising loss trains the U-Net alone: its magnitude (~1) dwarfs the rate-distortion
        # terms (~1e-2), and reaching h_s through `cond` it would tune the scales and means for
        # conditioning instead of for coding. The entropy model learns from the RD loss, which
        # also reaches the U-Net through the DDIM chain that makes the prediction.
        denoising = self.denoising_loss(y.detach(), cond.detach()) if self.training else y.new_zeros(())
        return {
            "x_hat": x_hat,
            "y": y,
            "z": z,
            "y_hat": y_hat,
            "prediction": prediction,
            "likelihoods": likelihoods,
            "denoising_loss": denoising,
        }

    def compress(self, x: torch.Tensor) -> dict:
        height, width = x.shape[-2:]
        y = self.g_a(self._pad(x))
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        scales, prediction, _ = self.hyper_decode(z_hat)
        strings = [z_strings]
        if self.config.mode == "residual":
            indexes = self.gaussian_conditional.build_indexes(scales)
            strings.insert(0, self.gaussian_conditional.compress(y, indexes, means=prediction))
        return {"strings": strings, "shape": (height, width)}

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        height, width = shape
        z_hat = self.entropy_bottleneck.decompress(strings[-1], self.z_shape(height, width))
        scales, prediction, _ = self.hyper_decode(z_hat)
        if self.config.mode == "residual":
            indexes = self.gaussian_conditional.build_indexes(scales)
            y_hat = self.gaussian_conditional.decompress(strings[0], indexes, z_hat.dtype, means=prediction)
        else:
            y_hat = prediction
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
        return 2 if self.config.mode == "residual" else 1

    # -- checkpoints --

    def trainable_state_dict(self) -> dict:
        """The state a checkpoint stores: everything but the frozen pretrained weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load a checkpoint's state. Entropy tables it leaves out (``slim_checkpoint``) stay empty
        until ``update(force=True)`` derives them; float tensors stored in fp16 are cast back."""
        own = self.state_dict()
        state = {k: own[k] for k in own if k.endswith(ENTROPY_TABLES) and k not in state} | state
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.frozen_prefixes)]
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

# With BK-SDM's 1000-step schedule, the chain starts at 20% of it, where the signal still
# dominates (alpha_bar ~ 0.75, as at the end of the from-scratch schedule).
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
    from diffusers import AutoencoderKL, UNet2DConditionModel

    frozen = []
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

    unet = scheduler = adapter = None
    if config.diffusion_steps > 0 and config.use_pretrained_unet:
        unet = _load_pretrained(UNet2DConditionModel, config.bk_sdm_path, "unet")
        if unet.config.in_channels != config.M or unet.config.out_channels != config.M:
            raise ValueError(
                f"the pretrained U-Net works on {unet.config.in_channels} latent channels but the latent has "
                f"M={config.M}; use the pretrained VAE with it (use_pretrained_vae=True) or set M to match"
            )
        scheduler = _load_pretrained(DDIMScheduler, config.bk_sdm_path, "scheduler")
        scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
        dim = unet.config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        adapter = CrossAttentionAdapter(2 * config.M, dim, config.adapter_grid)
        if not config.finetune_pretrained:
            unet.requires_grad_(False)
            frozen.append("unet.")
    elif config.diffusion_steps > 0:
        unet = scratch_unet(config.M, config.unet_channels, config.unet_levels, config.unet_layers_per_block)
        scheduler = DDIMScheduler(
            num_train_timesteps=config.diffusion_steps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=NOISE_SCHEDULES[config.noise_schedule],
            clip_sample=False,
            set_alpha_to_one=True,
            prediction_type="epsilon",
        )
    return DiffusionHyperprior(config, analysis, synthesis, unet, scheduler, adapter, latent_factor, tuple(frozen))


def create_bk_sdm_compression_model(
    bk_sdm_path: str | None = None,
    N: int = 128,
    M: int = 128,
    diffusion_steps: int = 30,
    use_pretrained_vae: bool = False,
    use_pretrained_unet: bool = False,
    **kwargs,
) -> DiffusionHyperprior:
    """The diffusion-hyperprior codec.

    Args:
        bk_sdm_path: a local diffusers folder or a hub id (e.g. ``nota-ai/bk-sdm-small``) holding
            ``vae/``, ``unet/`` and ``scheduler/``; needed only for pretrained components.
        N: channels of the transforms and of z.  M: latent channels (the VAE's when pretrained).
        diffusion_steps: DDIM steps that predict y (0: the hyper-decoder's output alone). For the
            from-scratch U-Net also its number of training timesteps.
        use_pretrained_vae / use_pretrained_unet: BK-SDM components instead of from-scratch ones.
        **kwargs: any other ``CodecConfig`` field: ``mode`` ("residual" or "z_only"),
            ``noise_schedule`` ("linear" or "cosine"), ``beta_start``, ``beta_end``,
            ``finetune_pretrained`` (pretrained parts are frozen unless True), ``unet_channels``,
            ``unet_levels``, ``unet_layers_per_block``, ``diffusion_strength`` (fraction of the
            schedule the chain covers; default 1.0 from scratch, 0.2 with BK-SDM's U-Net),
            ``latent_gain_init``, ``adapter_grid``, ``scale_table_levels``.
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


def create_diffusion_hyperprior_model(N: int = 128, M: int = 128, diffusion_steps: int = 50, **kwargs):
    """The from-scratch codec (no pretrained component), under the name its users already call."""
    return create_bk_sdm_compression_model(None, N=N, M=M, diffusion_steps=diffusion_steps, **kwargs)


def slim_checkpoint(ckpt: dict, half: bool = True) -> dict:
    """A codec checkpoint to ship: architecture, config and weights only (no optimizer state, no
    entropy tables: ``load_codec`` derives them). With ``half``, a float tensor is stored in fp16
    when that moves no value by more than fp16's epsilon times the tensor's largest magnitude;
    tensors of tiny values (GDN's reparametrised betas) keep fp32. About a third of the size."""
    eps = torch.finfo(torch.float16).eps

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (half and t.is_floating_point() and t.numel()):
            return t
        h = t.half()
        return h if (h.float() - t).abs().max() <= eps * t.abs().max() else t

    state = {k: pack(v) for k, v in ckpt["state_dict"].items() if not k.endswith(ENTROPY_TABLES)}
    return {"architecture": ckpt["architecture"], "config": ckpt["config"], "state_dict": state}


def load_codec(
    path: str | Path,
    device: str | torch.device = "cpu",
    bk_sdm_path: str | None = None,
    diffusion_steps: int | None = None,
) -> tuple[DiffusionHyperprior, dict]:
    """Rebuild a trained codec from a checkpoint, entropy tables ready, in eval mode.

    ``bk_sdm_path`` overrides where the pretrained parts are loaded from (e.g. a local copy);
    ``diffusion_steps`` overrides the number of DDIM steps used to predict y (0 included).
    """
    ckpt = lic_common.load_checkpoint(path)
    arch = ckpt.get("architecture")
    if arch != ARCHITECTURE or "config" not in ckpt or "state_dict" not in ckpt:
        what = f"a '{arch}' checkpoint" if arch else "not a checkpoint of train_bk_sdm_compression.py"
        raise lic_common.CheckpointError(f"{path}: {what}; expected a '{ARCHITECTURE}' codec checkpoint")
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
FORMAT_VERSION = 1
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
    if header.mode != model.config.mode or len(strings) != model.num_strings:
        raise BitstreamError(f"the file's mode {header.mode!r} does not match the checkpoint's")
    if header.diffusion_steps != model.inference_steps:
        model.set_inference_steps(header.diffusion_steps)
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
        if name == "compress":
            p.add_argument("--diffusion_steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
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
    read_bitstream(data, args.max_pixels)  # a bad file fails before the model is built
    model, _ = load_codec(args.checkpoint, args.device, args.bk_sdm_path)
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
    except (BitstreamError, lic_common.CheckpointError, lic_common.ImageError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

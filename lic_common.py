"""What several scripts of this project must share identically, and nothing else.

- image files: listing a folder, decoding any PNG / JPEG / WebP (grayscale, RGBA and 16-bit
  included) to a float RGB tensor in [0, 1] of shape (3, H, W), and writing one back as PNG;
- training crops: a square crop of an image downscaled by a random factor;
- scikit-image's bundled photographs as PNG files (the photographs no model here was trained on);
- metrics: PSNR on 8-bit RGB and MS-SSIM on RGB in [0, 1], as CompressAI's ``eval_model``;
- files: atomic writing (checkpoints, result JSON, images) and ``weights_only`` checkpoint loading;
- seeding;
- run plumbing: joining a ``torchrun`` process group, and Weights & Biases when asked for;
- start-up: the codec's names and effort levels its command lines offer, ``lazy_import``, and
  importing CompressAI quietly (``quiet_compressai``): it imports torch_geometric, whose
  ``torch.jit.script`` calls warn (FutureWarning) on every command.

Importing this module has no side effects, and it does not import CompressAI (several seconds
here: torch_geometric), so that the scripts answer ``--help`` before it loads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import sys
import random
import tempfile
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim


@contextmanager
def quiet_compressai():
    """Import CompressAI inside this block: it imports torch_geometric, whose ``torch.jit.script``
    calls warn (FutureWarning) on every command; the filter ends with the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield

# ---- Start-up ----

# The diffusion-hyperprior codec's names and levels that its three scripts' command lines offer
# (bk_sdm_compression.py re-exports them): their parsers read them here, before the codec loads.
ARCHITECTURE = "diffusion-hyperprior"  # what its checkpoints say they hold
MODES = ("residual", "z_only")
REVEALS = ("checkerboard", "channels")
EFFORT_ITERATIONS = (0, 4, 8, 16, 32)  # the latent search's iterations at each --effort (0: none)


def lazy_import(name: str) -> types.ModuleType:
    """``import name``, run at the module's first attribute access (the standard library's recipe,
    ``importlib.util.LazyLoader``): a script that imports the codec (and so CompressAI) this way
    answers --help and argument errors before it loads."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


# ---- Image files ----

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm")


class ImageError(ValueError):
    """An image file that cannot be decoded."""


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root`` (recursively), sorted by path.

    Raises ``FileNotFoundError`` when ``root`` does not exist and ``ValueError`` when it holds no
    image, so a wrong ``--data_path`` fails at once rather than after a model is built.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {root}")
    return files


def name_hash(name: str) -> str:
    """The MD5 hex digest of a file name: an order and a split that are the same on every machine,
    run and Python version (unlike ``hash()`` or a seeded shuffle)."""
    return hashlib.md5(name.encode()).hexdigest()


def in_validation_split(name: str, val_ratio: float) -> bool:
    """A train / validation split by ``name_hash``."""
    return int(name_hash(name)[:8], 16) / 2**32 < val_ratio


def pil_to_tensor(img: Image.Image, keep_8bit: bool = False) -> torch.Tensor:
    """A PIL image of any common mode as a float RGB tensor (3, H, W) in [0, 1] (with ``keep_8bit``,
    an 8-bit picture as a uint8 tensor (3, H, W) instead: a quarter of the memory; the codec takes
    either).

    Grayscale is replicated to three channels, alpha is dropped (the codec codes colour only),
    16-bit images keep their full range (Pillow's own ``convert("RGB")`` would clip them).
    Computed in float32 (x / 255 and x / 65535 are correctly rounded there: the same values as
    float64 rounded to float32), so a large picture costs 12 bytes a pixel, not 24.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32) / np.float32(65535)
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    else:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() else img.convert("RGB")
        arr = np.asarray(img)
    chw = np.require(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1), requirements=["C", "W"])
    t = torch.from_numpy(chw).expand(3, *arr.shape[:2])  # greyscale: one channel seen three times
    if t.dtype == torch.uint8:
        return t.contiguous() if keep_8bit else t.float().div_(255)
    return t.clamp(0.0, 1.0)


@dataclass(frozen=True)
class ImageMode:
    """What of an image file the codec keeps: ``grey`` (one channel: the codec takes it as
    (1, H, W) and writes it back as one), and what it drops (``notes``: an alpha channel that is not opaque,
    more than 8 bits per channel)."""

    grey: bool = False
    notes: tuple[str, ...] = ()


def _image_mode(img: Image.Image, rawmode: str) -> ImageMode:
    """``rawmode``: the file's pixel layout as its decoder reads it (``img.tile``, before ``load()``)."""
    bands = img.getbands()
    grey = bands in (("L",), ("L", "A"), ("1",), ("I",), ("F",)) or img.mode.startswith("I;16")
    notes = []
    if img.mode.startswith("I"):
        notes.append("16 bits per channel: coded from the full range, decoded to 8 bits")
    elif ";16" in rawmode:
        notes.append("16 bits per channel: read as 8 bits (Pillow reads 16-bit colour that way)")
    alpha = img.getchannel("A") if "A" in bands else img.convert("RGBA").getchannel("A") if "transparency" in img.info else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        notes.append("its alpha channel is dropped (the codec codes colour only)")
    return ImageMode(grey, tuple(notes))


def read_image(path: str | os.PathLike, keep_8bit: bool = False) -> tuple[torch.Tensor, ImageMode]:
    """Decode an image file (EXIF orientation applied) -> (RGB tensor (3, H, W), float in [0, 1] or,
    with ``keep_8bit``, uint8 for an 8-bit picture; its ``ImageMode``); ``ImageError`` if it can't."""
    try:
        with Image.open(path) as img:
            rawmode = img.tile[0].args if img.tile and isinstance(img.tile[0].args, str) else ""
            img = ImageOps.exif_transpose(img)
            img.load()
            return pil_to_tensor(img, keep_8bit), _image_mode(img, rawmode)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from e


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a float RGB tensor (3, H, W) in [0, 1]; ``ImageError`` if it can't."""
    return read_image(path)[0]


UNSEEN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


def write_sample_photos(folder: str | os.PathLike, names=UNSEEN_PHOTOS) -> list[Path]:
    """Photographs bundled with scikit-image, written as PNG into ``folder`` (offline). None of
    them is training data or Kodak: the checks on photographs the project has never seen."""
    import skimage.data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
        path = folder / f"{name}.png"
        if not path.is_file():
            with _atomic_file(path, "wb") as f:
                Image.fromarray(arr).save(f, format="PNG")
        paths.append(path)
    return paths


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float image(s) in [0, 1] to 8-bit values, rounded as a PNG writer would."""
    return x.detach().clamp(0, 1).mul_(255).round_().to(torch.uint8)  # one float copy: large pictures stay cheap


def scaled_crop(x: torch.Tensor, size: int, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``size`` x ``size`` crop of image ``x`` (3, H, W) resized by ``scale``: at a random
    position drawn from ``generator``, or centred without one. Only the window that becomes the
    crop is resized (bicubic, antialiased when shrinking). A scale that would leave the image
    smaller than the crop is raised to fit it (small images are upscaled)."""
    h, w = x.shape[-2:]
    scale = max(scale, size / min(h, w))
    side = min(round(size / scale), h, w)
    if generator is None:
        top, left = (h - side) // 2, (w - side) // 2
    else:
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
    x = x[:, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=side > size)[0].clamp(0, 1)
    return x


def random_scale(generator: torch.Generator, low: float, high: float) -> float:
    """A downscaling factor drawn uniformly from [low, high] (1, 1: none)."""
    return low + (high - low) * torch.rand(1, generator=generator).item()


# ---- Writing files atomically ----


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_file(path: str | os.PathLike, mode: str):
    """A file object on a temporary file in ``path``'s folder, renamed onto ``path`` when the block
    ends without error: a crash mid-write never leaves a truncated file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (one connection, no retries): an uncached hub id
    then fails at once offline instead of after huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a JSON result, a cache) atomically."""
    with _atomic_file(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file (a compressed picture) atomically."""
    with _atomic_file(path, "wb") as f:
        f.write(data)


def save_image(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a float image in [0, 1], RGB (3, H, W) or greyscale (1, H, W), as an 8-bit PNG (atomically)."""
    arr = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    grey = arr.shape[2] == 1
    with _atomic_file(path, "wb") as f:
        Image.fromarray(arr[:, :, 0] if grey else arr, "L" if grey else "RGB").save(f, format="PNG")


# ---- Metrics ----

MS_SSIM_MIN_SIDE = 161  # pytorch-msssim's 5 scales with an 11-tap window need sides > 160 px


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """PSNR in dB on 8-bit RGB (both images rounded to 8 bits first), over a whole batch."""
    mse = F.mse_loss(to_uint8(x).float(), to_uint8(x_hat).float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim(x: torch.Tensor, x_hat: torch.Tensor, size_average: bool = True) -> torch.Tensor:
    """MS-SSIM on RGB in [0, 1] (differentiable), as CompressAI's ``eval_model`` computes it.

    Images with a side of 160 px or less are too small for MS-SSIM's five scales; for them this
    returns single-scale SSIM, which is what the five-scale product degenerates towards.
    """
    x_hat = x_hat.clamp(0, 1)
    if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
        return _ms_ssim(x.float(), x_hat.float(), data_range=1.0, size_average=size_average)
    return _ssim(x.float(), x_hat.float(), data_range=1.0, size_average=size_average)


def bpp_from_likelihoods(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel, -sum(log2 p) / pixels, from a model's likelihood tensors."""
    bits = sum(torch.log(p).sum() for p in likelihoods.values())
    return bits / (-math.log(2) * num_pixels)


# ---- Checkpoints ----


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see ``_atomic_file``)."""
    with _atomic_file(path, "wb") as f:
        torch.save(state, f)


def half_where_exact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict to ship: each float tensor in fp16 when that moves no value by more than
    fp16's epsilon times the tensor's largest magnitude, else as it is (tensors of tiny values,
    such as GDN's reparametrised betas, keep fp32). ``load_state_dict`` casts them back."""
    eps = torch.finfo(torch.float16).eps

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_floating_point() and t.numel()):
            return t
        h = t.half()
        return h if (h.float() - t).abs().max() <= eps * t.abs().max() else t

    return {k: pack(v) for k, v in state.items()}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong kind."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear ``CheckpointError`` when it can't."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file, some with pages of advice
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or a damaged one ({first})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project (not a dict)")
    return ckpt


# ---- Resuming a run ----


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written out in ``argv`` (``--flag``, ``--flag=value``,
    ``--no-flag``), looked up in the parser and in its sub-commands' parsers."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            actions += [a for sub in action.choices.values() for a in sub._actions]
    written = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {a.dest for a in actions if written & set(a.option_strings)}


def resumed_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], path: str | os.PathLike,
                     keys: tuple[str, ...], may_change: frozenset[str], own: tuple[str, ...]) -> argparse.Namespace:  # fmt: skip
    """A resumed run is the same run: its settings are the ones saved in its checkpoint ``path``
    (under ``keys``), not the defaults, except ``own`` (where the run is and how it is resumed:
    always the command line's). An option written out in ``argv`` overrides one of ``may_change``
    with a printed line and is refused (``parser.error``) for any other setting it would change."""
    if not Path(path).is_file():
        parser.error(f"--resume: no checkpoint at {path}")
    try:
        saved = load_checkpoint(path)
    except CheckpointError as e:
        parser.error(f"--resume: {e}")
    for key in keys:
        saved = saved.get(key) if isinstance(saved, dict) else None
    command = getattr(args, "command", None)
    if not isinstance(saved, dict) or saved.get("command", command) != command:
        parser.error(f"--resume: {path} is not a {command or 'training'} checkpoint of this script (no saved settings)")
    saved = {k: v for k, v in saved.items() if k not in own}
    resolved = {**vars(args), **saved}
    for name in sorted(explicit_options(parser, argv)):
        if name not in saved or getattr(args, name, None) == saved[name]:
            continue
        new, old = getattr(args, name), saved[name]
        if name not in may_change:
            parser.error(f"--{name} {new} differs from the resumed run's {old}: a resumed run keeps its settings "
                         "(drop the option, or start another run)")  # fmt: skip
        print(f"resume: --{name} {new} (the run had {old})")
        resolved[name] = new
    return argparse.Namespace(**resolved)


# ---- Seeding ----


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _numpy_state_to_plain(state: tuple) -> tuple:
    # NumPy arrays are not among what ``torch.load(weights_only=True)`` accepts; lists are.
    name, keys, pos, has_gauss, cached = state
    return (name, keys.tolist(), int(pos), int(has_gauss), float(cached))


def rng_state() -> dict:
    """Every random generator's state, for a checkpoint that resumes exactly."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- Run plumbing ----


def setup_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group (NCCL on CUDA, gloo on the CPU) under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's AVX-512-BF16 and AMX, Arm's BF16


def cpu_bf16_is_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 in hardware, as Linux's /proc/cpuinfo (or ``cpuinfo``)
    lists its flags; None where it cannot tell. Without it PyTorch emulates bfloat16, and CPU
    autocast runs slower than fp32 (3x for the codec's training step on one such machine)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(CPU_BF16_FLAGS & set(value.split()))
    return None


def cpu_amp_warning(device: torch.device, amp: bool) -> str | None:
    """The warning to print when bfloat16 autocast would run emulated on this CPU, else None."""
    if amp and device.type == "cpu" and cpu_bf16_is_native() is False:
        return ("--amp on a CPU without bfloat16 instructions (no AVX-512-BF16 / AMX in /proc/cpuinfo): "
                "PyTorch emulates bfloat16, slower than fp32; consider --no-amp")
    return None


def init_wandb(project: str | None, config: dict, name: str | None = None):
    """A Weights & Biases run when ``project`` is given, wandb is installed and
    ``WANDB_DISABLED`` is not true; otherwise None (TensorBoard remains)."""
    if not project or os.environ.get("WANDB_DISABLED", "").lower() == "true":
        return None
    try:
        import wandb
    except ImportError:
        print("note: a W&B project was given but wandb is not installed; logging to TensorBoard only", file=sys.stderr)
        return None
    return wandb.init(project=project, config=config, name=name)

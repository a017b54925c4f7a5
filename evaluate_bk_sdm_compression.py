"""Measure codecs on a folder of images: PSNR, MS-SSIM and bits per pixel from real bitstreams.

Every rate point of every curve is measured on the same images in one call:
- checkpoints of the diffusion-hyperprior codec (``--model_path``: several make a curve);
- CompressAI checkpoints, of this project's training script or CompressAI's own (``--curve``);
- the classical codecs Pillow has: JPEG, WebP, AVIF (``--classical``).

Per image: PSNR on 8-bit RGB, MS-SSIM on 8-bit RGB scaled to [0, 1] (as CompressAI's
``eval_model``), bpp from the real bytes (for this codec the whole file, header included) beside
the likelihood estimate and the ideal code length under the entropy coder's own tables (so the
coder's overhead and the cost of quantising the model into tables are separate figures),
compression ratio (24 bpp / bpp), encode and decode time, peak memory, and whether
``decompress(compress(x))`` reproduces the forward pass's reconstruction.

Writes into ``--output_dir``: ``<curve>.json`` in CompressAI's results format (its plotting tool
reads them), ``per_image.csv``, ``summary.json`` with BD-rates (PSNR and MS-SSIM) of every curve
against ``--anchor``, ``rd_plot.png``, and with ``--save_samples`` the original, reconstruction
and error map of every image.

    python evaluate_bk_sdm_compression.py --model_path outputs/q1/best_checkpoint.pth \
        outputs/q2/best_checkpoint.pth --data_path ../shared/data/kodak --classical jpeg webp
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import lic_common

bk = lic_common.lazy_import("bk_sdm_compression")  # the codec (and CompressAI) load at first use: --help answers before

# ---- Codecs under a common interface ----


class Codec:
    """A rate point: ``code(x) -> (bytes, x_hat, seconds_enc, seconds_dec)``, plus an optional
    ``estimate(batch) -> (bpp per image, x_hat)`` from the model's forward pass."""

    label: str
    point: str

    def code(self, x: torch.Tensor):
        raise NotImplementedError

    def estimate(self, x: torch.Tensor):
        return None

    def table_bits(self, x: torch.Tensor) -> float | None:
        """Ideal code length of ``x``'s symbols under the entropy coder's own tables (learned codecs)."""
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- Entropy-coder efficiency ----

RANS_BYPASS_BITS = 4  # CompressAI's rANS writes an escaped value in 4-bit chunks (rans_interface.cpp)


def table_code_bits(symbols, indexes, cdfs, cdf_lengths, offsets, precision: int = 16) -> float:
    """The ideal code length, in bits, of ``symbols`` under the quantized CDF tables CompressAI's
    rANS coder is handed (``encode_with_indexes``'s arguments): -log2 of each symbol's table
    probability, plus the raw bits of the escape code for a value outside its table (the table's
    last entry, then the count of 4-bit chunks in 4-bit chunks, then the chunks). What a perfect
    coder with the same tables would write; the real string adds only the coder's final state."""
    idx = np.asarray(indexes, np.int64)
    lengths = np.asarray(cdf_lengths, np.int64)
    table = np.zeros((len(cdfs), int(lengths.max())), np.int64)
    for i, cdf in enumerate(cdfs):
        table[i, : lengths[i]] = cdf[: lengths[i]]
    max_value = lengths[idx] - 2
    value = np.asarray(symbols, np.int64) - np.asarray(offsets, np.int64)[idx]
    escaped = (value < 0) | (value >= max_value)
    raw = np.where(value < 0, -2 * value - 1, 2 * (value - max_value))[escaped]
    value = np.where(escaped, max_value, value)
    freq = table[idx, value + 1] - table[idx, value]
    bits = float(precision * len(value) - np.log2(freq).sum())
    max_chunk = 2**RANS_BYPASS_BITS - 1
    for r in raw.tolist():
        chunks = -(-int(r).bit_length() // RANS_BYPASS_BITS)
        bits += RANS_BYPASS_BITS * (chunks // max_chunk + 1 + chunks)
    return bits


class CodeLengthMeter:
    """Stands in for an entropy model's coder: adds up ``table_code_bits`` of everything it is asked
    to encode, then hands the call to the real coder (so the bytes are unchanged)."""

    def __init__(self, coder, precision: int):
        self.coder, self.precision, self.bits = coder, precision, 0.0

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_lengths, offsets):
        self.bits += table_code_bits(symbols, indexes, cdfs, cdf_lengths, offsets, self.precision)
        return self.coder.encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets)

    def decode_with_indexes(self, *args):
        return self.coder.decode_with_indexes(*args)


@contextlib.contextmanager
def metered_coders(model: nn.Module):
    """Within the block every entropy model of ``model`` codes through a ``CodeLengthMeter``;
    yields a function returning the bits metered so far."""
    from compressai.entropy_models import EntropyModel

    entropy_models = [m for m in model.modules() if isinstance(m, EntropyModel)]
    meters = [CodeLengthMeter(m.entropy_coder, m.entropy_coder_precision) for m in entropy_models]
    for m, meter in zip(entropy_models, meters):
        m.entropy_coder = meter
    try:
        yield lambda: sum(meter.bits for meter in meters)
    finally:
        for m, meter in zip(entropy_models, meters):
            m.entropy_coder = meter.coder


class LearnedCodec(Codec):
    """This project's codec (the whole file is counted) or a CompressAI model (its strings, as
    ``eval_model`` counts them; images padded with zeros to a multiple of 64 and cropped back)."""

    def __init__(self, label: str, point: str, model: nn.Module, device: torch.device, quality: float | None = None, model_id=None,
                 effort: int = 0):  # fmt: skip
        self.label, self.point, self.model, self.device = label, point, model.to(device).eval(), device
        self.effort = effort if isinstance(model, bk.DiffusionHyperprior) else 0  # the encoder's latent search (ours)
        self.ours = isinstance(model, bk.DiffusionHyperprior)
        self.model_id = (model_id or model.fingerprint()) if self.ours else None
        self.quality = quality  # a variable-rate checkpoint's rate point
        self.kwargs = {} if quality is None else {"quality": quality}

    def _pad(self, x):
        h, w = x.shape[-2:]
        return F.pad(x, (0, (-w) % 64, 0, (-h) % 64)) if not self.ours else x

    @torch.no_grad()
    def code(self, x):
        h, w = x.shape[-2:]
        x = x.to(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        if self.ours:
            data = bk.encode_image(self.model, x, max_pixels=h * w, model_id=self.model_id, quality=self.quality, effort=self.effort)
        else:
            enc = self.model.compress(self._pad(x[None]))
            data = b"".join(s[0] for s in enc["strings"])
        _sync(self.device)
        t1 = time.perf_counter()
        if self.ours:
            x_hat = bk.decode_image(self.model, data, max_pixels=h * w, model_id=self.model_id)
        else:
            x_hat = self.model.decompress(enc["strings"], enc["shape"])["x_hat"][0, :, :h, :w]
        _sync(self.device)
        t2 = time.perf_counter()
        return data, x_hat.clamp(0, 1).cpu(), t1 - t0, t2 - t1

    @torch.no_grad()
    def table_bits(self, x):
        """A second, metered encode (kept out of ``code`` so that its timing is the coder's own).
        None for CompressAI's serial-context models, which code y through a coder of their own
        that the meter does not see."""
        from compressai.models import JointAutoregressiveHierarchicalPriors

        if isinstance(self.model, JointAutoregressiveHierarchicalPriors):
            return None
        with metered_coders(self.model) as metered:
            self.model.compress(self._pad(x.to(self.device)[None]), **self.kwargs)
            return metered()

    @torch.no_grad()
    def estimate(self, x):
        h, w = x.shape[-2:]
        out = self.model(self._pad(x.to(self.device)), **self.kwargs)
        bits = sum(-torch.log2(p).flatten(1).sum(1) for p in out["likelihoods"].values())
        return (bits / (h * w)).cpu().tolist(), out["x_hat"][..., :h, :w].clamp(0, 1).cpu()


class PillowCodec(Codec):
    """JPEG, WebP or AVIF at one quality setting, through Pillow (4:2:0 chroma, its defaults)."""

    FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}

    def __init__(self, name: str, quality: int):
        self.label, self.point, self.name, self.quality = name, f"q{quality}", name, quality

    def code(self, x):
        img = Image.fromarray(lic_common.to_uint8(x).permute(1, 2, 0).numpy(), "RGB")
        buf = io.BytesIO()
        t0 = time.perf_counter()
        img.save(buf, format=self.FORMATS[self.name], quality=self.quality)
        t1 = time.perf_counter()
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as dec:
            x_hat = lic_common.pil_to_tensor(dec.convert("RGB"))
        return data, x_hat, t1 - t0, time.perf_counter() - t1


# The lowest settings reach down to the 0.1-0.3 bpp where briefly trained learned codecs sit, so BD-rates
# against them have an overlapping quality range.
DEFAULT_QUALITIES = {"jpeg": [5, 10, 30, 50, 75, 90], "webp": [0, 10, 30, 50, 75, 90], "avif": [5, 20, 40, 60, 75, 90]}


def load_learned(path: str, args: argparse.Namespace, arch: str | None = None, ckpt: dict | None = None) -> nn.Module:
    """A codec checkpoint of this project, or a CompressAI one (architecture from the checkpoint
    or ``arch``). Pretrained-component flags, when given, must agree with the checkpoint.
    ``ckpt``: the checkpoint already loaded from ``path``, to read it once."""
    ckpt = lic_common.load_checkpoint(path) if ckpt is None else ckpt
    kind = ckpt.get("architecture", arch)
    if kind == bk.ARCHITECTURE:
        model, _ = bk.load_codec(path, "cpu", args.bk_sdm_path, args.diffusion_steps, ckpt)
        for flag in ("use_pretrained_vae", "use_pretrained_unet"):
            wanted = getattr(args, flag)
            if wanted is not None and wanted != getattr(model.config, flag):
                raise lic_common.CheckpointError(f"{path} was trained with {flag}={getattr(model.config, flag)}, not {wanted}")
        return model
    from compressai.zoo.image import model_architectures

    if kind not in model_architectures:
        raise lic_common.CheckpointError(f"{path}: unknown architecture {kind!r}; name it as LABEL=ARCH:PATH")
    state = ckpt.get("state_dict", ckpt)
    try:
        model = model_architectures[kind].from_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise lic_common.CheckpointError(f"{path}: not a {kind} checkpoint ({type(e).__name__}: {e})") from None
    model.update(force=True)
    return model


def build_codecs(args: argparse.Namespace, device: torch.device) -> list[Codec]:
    """Every rate point to measure, in the order of the flags."""
    curves: list[tuple[str, str | None, list[str]]] = []
    if args.model_path:
        curves.append((args.label, None, args.model_path))
    for spec in args.curve or []:
        label, _, rest = spec.partition("=")
        arch, _, paths = rest.rpartition(":") if ":" in rest else ("", "", rest)
        if not label or not paths:
            raise ValueError(f"--curve {spec!r}: expected LABEL=[ARCH:]PATH[,PATH...]")
        curves.append((label, arch or None, paths.split(",")))
    codecs: list[Codec] = []
    for label, arch, paths in curves:
        for path in paths:
            ckpt = lic_common.load_checkpoint(path)
            name = label or ckpt.get("architecture", arch or "learned")
            model, point = load_learned(path, args, arch, ckpt), Path(path).parent.name + "/" + Path(path).stem
            levels = model.config.rate_levels if isinstance(model, bk.DiffusionHyperprior) else 0
            if args.qualities and not levels:
                raise ValueError(f"--qualities: {path} codes at one rate (a variable-rate checkpoint sweeps qualities)")
            if not levels:
                codecs.append(LearnedCodec(name, point, model, device, effort=args.effort))
                continue
            qualities = args.qualities or [float(q) for q in range(1, levels + 1)]
            if any(not 1 <= q <= levels for q in qualities):
                raise ValueError(f"--qualities: {path} takes qualities in [1, {levels}], got {qualities}")
            qualities = [model.recorded_quality(q) for q in qualities]  # as files record them
            model_id = model.fingerprint()  # one curve from one checkpoint, a rate point per quality
            codecs += [LearnedCodec(name, f"{point}@q{q:g}", model, device, q, model_id, args.effort) for q in qualities]
    for name in args.classical:
        codecs += [PillowCodec(name, q) for q in getattr(args, f"{name}_qualities") or DEFAULT_QUALITIES[name]]
    if not codecs:
        raise ValueError("nothing to measure: give --model_path, --curve or --classical")
    return codecs


# ---- Measuring ----


@dataclass
class ImageResult:
    curve: str
    point: str
    image: str
    bpp: float
    bpp_estimate: float
    psnr: float
    ms_ssim: float
    compression_ratio: float
    encode_seconds: float
    decode_seconds: float
    peak_memory_mb: float
    roundtrip_matches_forward: bool | None
    bpp_table: float = math.nan  # ideal code length under the coder's tables (table_code_bits)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def image_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float]:
    """(PSNR on 8-bit RGB, MS-SSIM on 8-bit RGB in [0, 1])."""
    x8, y8 = (lic_common.to_uint8(t).float() / 255 for t in (x, x_hat))
    return lic_common.psnr(x, x_hat), lic_common.ms_ssim(x8[None], y8[None]).item()


def evaluate(codecs: list[Codec], files: list[Path], args: argparse.Namespace, device: torch.device) -> list[ImageResult]:
    """Measure every codec on every image; batches of same-size images for the estimates."""
    images = {p: lic_common.load_image(p) for p in files}
    results = []
    bar = tqdm(total=len(codecs) * len(images), unit="image", disable=not args.progress, dynamic_ncols=True)
    for codec in codecs:
        bar.set_description(f"{codec.label} {codec.point}")
        estimates = {}
        by_size: dict[tuple, list[Path]] = {}
        for p, x in images.items():
            by_size.setdefault(tuple(x.shape), []).append(p)
        for group in by_size.values():
            for i in range(0, len(group), args.batch_size):
                chunk = group[i : i + args.batch_size]
                est = codec.estimate(torch.stack([images[p] for p in chunk]))
                if est is not None:
                    for p, bpp, x_hat in zip(chunk, est[0], est[1]):
                        estimates[p] = (bpp, x_hat)
        mismatched = []  # (fraction of values, max difference) of images whose file decodes unlike the forward pass
        for p, x in images.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            data, x_hat, t_enc, t_dec = codec.code(x)
            h, w = x.shape[-2:]
            bpp = 8 * len(data) / (h * w)
            psnr, msssim = image_metrics(x, x_hat)
            matches = None
            bpp_est = math.nan
            if p in estimates:
                bpp_est, x_fwd = estimates[p]
            if p in estimates and not getattr(codec, "effort", 0):  # a searched latent is not the forward pass's
                matches = bool(torch.equal(lic_common.to_uint8(x_fwd), lic_common.to_uint8(x_hat)))
                if not matches:
                    diff = (lic_common.to_uint8(x_fwd).int() - lic_common.to_uint8(x_hat).int()).abs()
                    mismatched.append(((diff > 0).float().mean().item(), diff.max().item()))
            table_bits = codec.table_bits(x)
            bpp_table = math.nan if table_bits is None else table_bits / (h * w)
            results.append(ImageResult(codec.label, codec.point, p.name, bpp, bpp_est, psnr, msssim, 24 / bpp,
                                       t_enc, t_dec, peak_memory_mb(device), matches, bpp_table))  # fmt: skip
            if args.save_samples:
                save_samples(Path(args.output_dir) / "samples" / codec.label / codec.point.replace("/", "_"), p.stem, x, x_hat)
            bar.update()
        if mismatched:  # the float forward (the estimate) against the file's exact integer entropy model
            tqdm.write(f"note: {codec.label} {codec.point}: on {len(mismatched)} of {len(images)} images decompress(compress(x)) "
                  f"differs from the float forward pass, in at most {max(f for f, _ in mismatched):.3%} of the values, "
                  f"by at most {max(d for _, d in mismatched)} / 255")  # fmt: skip
        point = [r for r in results if (r.curve, r.point) == (codec.label, codec.point)]
        tqdm.write(f"{codec.label:>24} {codec.point:<28} bpp {np.mean([r.bpp for r in point]):.4f} "
              f"(est. {np.mean([r.bpp_estimate for r in point]):.4f})  PSNR {np.mean([r.psnr for r in point]):.2f} dB  "
              f"MS-SSIM {np.mean([r.ms_ssim for r in point]):.4f}")  # fmt: skip
    bar.close()
    return results


def save_samples(folder: Path, stem: str, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """Original, reconstruction, and the absolute error (x4, grey) of one image."""
    lic_common.save_image(x, folder / f"{stem}_original.png")
    lic_common.save_image(x_hat, folder / f"{stem}_reconstruction.png")
    err = ((x - x_hat).abs().mean(0, keepdim=True) * 4).clamp(0, 1).repeat(3, 1, 1)
    lic_common.save_image(err, folder / f"{stem}_error.png")


# ---- Curves, BD-rate, plot ----


def curves_from_results(results: list[ImageResult]) -> dict[str, dict]:
    """Per curve, its points averaged over images, in CompressAI's results JSON format."""
    curves: dict[str, dict] = {}
    for r in results:
        c = curves.setdefault(r.curve, {"name": r.curve, "description": "", "points": {}})
        c["points"].setdefault(r.point, []).append(r)
    out = {}
    for label, c in curves.items():
        points = sorted(c["points"].items(), key=lambda kv: np.mean([r.bpp for r in kv[1]]))
        results_json = {
            key: [float(np.mean([getattr(r, field) for r in rs])) for _, rs in points]
            for key, field in (("psnr-rgb", "psnr"), ("ms-ssim-rgb", "ms_ssim"), ("bpp", "bpp"),
                               ("bpp-estimate", "bpp_estimate"), ("bpp-table", "bpp_table"), ("encoding_time", "encode_seconds"),
                               ("decoding_time", "decode_seconds"), ("peak_memory_mb", "peak_memory_mb"))
        }  # fmt: skip
        results_json["points"] = [name for name, _ in points]
        out[label] = {"name": label, "description": f"measured by evaluate_bk_sdm_compression.py on {len(points[0][1])} images",
                      "results": results_json}  # fmt: skip
    return out


def bd_rate(anchor_rate, anchor_quality, test_rate, test_quality) -> float:
    """Bjontegaard delta rate in percent (negative: the test curve needs fewer bits).

    log(rate) is interpolated as a function of quality with monotone cubic (PCHIP) pieces, as in
    the current JVET/AOM tools, and the mean difference over the overlapping quality range is
    taken. NaN when the curves do not overlap or have fewer than two points.
    """
    from scipy.interpolate import PchipInterpolator

    def fit(rate, quality):
        q, lr = np.asarray(quality, float), np.log(np.asarray(rate, float))
        order = np.argsort(q)
        q, lr = q[order], lr[order]
        keep = np.concatenate([[True], np.diff(q) > 0])
        return q[keep], lr[keep]

    qa, ra = fit(anchor_rate, anchor_quality)
    qt, rt = fit(test_rate, test_quality)
    if len(qa) < 2 or len(qt) < 2:
        return math.nan
    lo, hi = max(qa[0], qt[0]), min(qa[-1], qt[-1])
    if hi <= lo:
        return math.nan
    ia = PchipInterpolator(qa, ra).integrate(lo, hi)
    it = PchipInterpolator(qt, rt).integrate(lo, hi)
    return float((math.exp((it - ia) / (hi - lo)) - 1) * 100)


def msssim_db(values) -> np.ndarray:
    return -10 * np.log10(1 - np.asarray(values, float))


def bd_rates(curves: dict[str, dict], anchor: str) -> dict[str, dict]:
    """BD-rate (PSNR and MS-SSIM in dB) of every curve against ``anchor``."""
    if anchor not in curves:
        raise ValueError(f"--anchor {anchor!r} is not among the curves {sorted(curves)}")
    a = curves[anchor]["results"]
    out = {}
    for label, c in curves.items():
        r = c["results"]
        out[label] = {
            "bd_rate_psnr": bd_rate(a["bpp"], a["psnr-rgb"], r["bpp"], r["psnr-rgb"]),
            "bd_rate_ms_ssim": bd_rate(a["bpp"], msssim_db(a["ms-ssim-rgb"]), r["bpp"], msssim_db(r["ms-ssim-rgb"])),
        }
    return out


def plot_rd(curves: dict[str, dict], path: Path, published: list[dict] = (), title: str = "") -> None:
    """PSNR and MS-SSIM (dB) against bpp, all curves, published ones dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, style in [(c, "o-") for c in curves.values()] + [(c, "x--") for c in published]:
        r = c["results"]
        axes[0].plot(r["bpp"], r["psnr-rgb"], style, label=c["name"])
        if "ms-ssim-rgb" in r:
            axes[1].plot(r["bpp"], msssim_db(r["ms-ssim-rgb"]), style, label=c["name"])
    for ax, ylabel in zip(axes, ("PSNR-RGB (dB)", "MS-SSIM-RGB (dB)")):
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_per_image_csv(results: list[ImageResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)


def write_outputs(results: list[ImageResult], args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_per_image_csv(results, out / "per_image.csv")
    curves = curves_from_results(results)
    for label, c in curves.items():
        (out / f"{label}.json").write_text(json.dumps(c, indent=2))
    published = [json.loads(Path(p).read_text()) for p in args.published or []]
    anchor = args.anchor or next(iter(curves))
    summary = {"anchor": anchor, "curves": curves, "bd_rates": bd_rates(curves, anchor),
               "images": sorted({r.image for r in results}),
               "roundtrip_mismatches": sum(r.roundtrip_matches_forward is False for r in results)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rd(curves, out / "rd_plot.png", published, title=f"{Path(args.data_path).name} ({len(summary['images'])} images)")
    def pct(v: float) -> str:
        return "    n/a" if math.isnan(v) else f"{v:+7.2f}%"

    for label, bd in summary["bd_rates"].items():
        if label != anchor:  # n/a: a single point, or no overlap with the anchor's range
            print(f"BD-rate vs {anchor}: {label:>24}  PSNR {pct(bd['bd_rate_psnr'])}   MS-SSIM {pct(bd['bd_rate_ms_ssim'])}")
    return summary


# ---- Command line ----


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", nargs="*", default=[], help="codec checkpoints, one rate point each, forming one curve")
    p.add_argument("--qualities", type=float, nargs="+", default=None, help="a variable-rate checkpoint's qualities to measure, one rate point each (default: its trained levels 1, 2, ...)")
    p.add_argument("--label", default=None, help="name of the --model_path curve (default: the checkpoints' architecture)")
    p.add_argument("--curve", action="append", help="another curve: LABEL=[ARCH:]PATH[,PATH...] (ARCH for CompressAI's own checkpoints)")
    p.add_argument("--classical", nargs="*", default=[], choices=tuple(PillowCodec.FORMATS), help="Pillow codecs to measure")
    for name, qualities in DEFAULT_QUALITIES.items():
        p.add_argument(f"--{name}_qualities", type=int, nargs="+", default=None, help=f"{name} quality settings (default {qualities})")
    p.add_argument("--anchor", default=None, help="curve that BD-rates are computed against (default: the first)")
    p.add_argument("--published", nargs="*", default=[], help="CompressAI-format result JSON files to overlay on the plot")
    p.add_argument("--bk_sdm_path", default=None, help="where the pretrained BK-SDM parts are, if not where the checkpoint says")
    p.add_argument("--use_pretrained_vae", action=argparse.BooleanOptionalAction, default=None, help="require checkpoints with (or without) BK-SDM's VAE")
    p.add_argument("--use_pretrained_unet", action=argparse.BooleanOptionalAction, default=None, help="require checkpoints with (or without) BK-SDM's U-Net")
    p.add_argument("--diffusion_steps", type=int, default=None, help="reverse steps: the checkpoints' (default) or 0 (the hyper-decoder alone)")
    p.add_argument("--effort", type=int, default=0, choices=range(len(lic_common.EFFORT_ITERATIONS)),
                   help="our encoder's effort (compress --effort): 0 codes the analysis transform's latent, as the estimate does; "
                        "higher levels search a better one per image")  # fmt: skip
    p.add_argument("--data_path", required=True, help="folder of images (e.g. ../shared/data/kodak)")
    p.add_argument("--output_dir", default="./evaluation_results", help="where results go")
    p.add_argument("--batch_size", type=int, default=2, help="images per forward pass for the likelihood estimate")
    p.add_argument("--save_samples", action=argparse.BooleanOptionalAction, default=False, help="save original, reconstruction and error map per image")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar over curves and images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads < 0 or args.batch_size < 1 or (args.diffusion_steps is not None and args.diffusion_steps < 0):
        p.error("--threads must be >= 0, --batch_size >= 1 and --diffusion_steps >= 0")
    if args.qualities and min(args.qualities) < 1:
        p.error(f"--qualities must be >= 1, got {args.qualities}")
    for name in DEFAULT_QUALITIES:
        qualities = getattr(args, f"{name}_qualities") or []
        if any(not 0 <= q <= 100 for q in qualities):
            p.error(f"--{name}_qualities must lie in [0, 100], got {qualities}")
    for spec in args.curve or []:
        label, _, rest = spec.partition("=")
        if not label or not rest:
            p.error(f"--curve {spec!r}: expected LABEL=[ARCH:]PATH[,PATH...]")
    return args


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        files = lic_common.list_images(args.data_path)
        codecs = build_codecs(args, device)
        if args.anchor is not None and args.anchor not in {c.label for c in codecs}:
            raise ValueError(f"--anchor {args.anchor!r} is not among the curves {sorted({c.label for c in codecs})}")
        results = evaluate(codecs, files, args, device)
    except (lic_common.CheckpointError, lic_common.ImageError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return write_outputs(results, args)


if __name__ == "__main__":
    main(sys.argv[1:])

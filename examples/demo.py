"""The demo: compress photographs with the diffusion-hyperprior codec, next to JPEG and WebP.

Offline and on the CPU. With the checkpoints in ``reference_checkpoints/`` it uses them (a
variable-rate checkpoint at several qualities, a fixed-rate one at its rate); otherwise it first trains a
small codec for ``--train_minutes`` on photographs that ship with scikit-image. For each
photograph (by default three of scikit-image's, none of them training data) and checkpoint it
writes a compressed file, decodes it, and compares bpp / PSNR / MS-SSIM with JPEG and WebP at the
same file size (the largest quality whose file is no larger than ours); it saves a side-by-side
picture per photograph and an RD plot of the means.

    python examples/demo.py --output_dir demo_output
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as train  # noqa: E402
from evaluate_bk_sdm_compression import image_metrics, plot_rd  # noqa: E402

TRAIN_PHOTOS = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina")  # only for the fallback codec
TEST_PHOTOS = ("chelsea", "coffee", "rocket")


def write_sample_photos(folder: Path) -> tuple[Path, list[Path]]:
    """scikit-image's bundled photographs as PNG: a training folder and the held-out test photos."""
    lic_common.write_sample_photos(folder / "train", TRAIN_PHOTOS)
    return folder / "train", lic_common.write_sample_photos(folder, TEST_PHOTOS)


def train_quick_codec(data: Path, out: Path, minutes: float) -> Path:
    """A small from-scratch codec trained for a few minutes by the project's training script."""
    argv = ["--data_path", str(data), "--output_dir", str(out), "--N", "64", "--M", "96",
            "--diffusion_steps", "4", "--unet_channels", "32", "--image_size", "128", "--batch_size", "8",
            "--epoch_size", "64", "--epochs", "1000", "--lr", "1e-3", "--warmup_steps", "20",
            "--lambda_rate", "2e-3", "--time_budget", str(minutes), "--budget_clock", "process",
            "--num_workers", "0", "--val_fraction", "0.2",
            "--no-progress"]  # fmt: skip
    train.main(argv)
    return out / "best_checkpoint.pth"


def same_size_classical(x: torch.Tensor, fmt: str, budget: int) -> tuple[int, int, torch.Tensor]:
    """(quality, bytes, decoded) of the largest quality whose file fits in ``budget`` bytes."""
    img = Image.fromarray(lic_common.to_uint8(x).permute(1, 2, 0).numpy(), "RGB")
    best = None
    for quality in range(1, 101):
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=quality)
        if buf.tell() > budget and best is not None:
            break
        best = (quality, buf.getvalue())
    quality, data = best
    if len(data) > budget:
        print(f"note: even {fmt} quality 1 ({len(data)} bytes) is larger than our file ({budget} bytes)")
    with Image.open(io.BytesIO(data)) as dec:
        return quality, len(data), lic_common.pil_to_tensor(dec.convert("RGB"))


def side_by_side(images: list[torch.Tensor], path: Path) -> None:
    row = torch.cat([torch.nn.functional.pad(t, (4, 4, 4, 4), value=1.0) for t in images], dim=-1)
    lic_common.save_image(row, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default=str(ROOT / "demo_output"), help="where everything is written")
    p.add_argument("--checkpoint", nargs="*", default=None, help="codec checkpoints to use (default: reference_checkpoints/*.pth, else train one)")
    p.add_argument("--qualities", type=float, nargs="+", default=None, help="a variable-rate checkpoint's qualities (default: its odd levels)")
    p.add_argument("--train_minutes", type=float, default=2.0, help="training CPU-minutes (all threads) when there is no checkpoint")
    p.add_argument("--images", nargs="+", default=None, help=f"photographs to compress (default: scikit-image's {', '.join(TEST_PHOTOS)})")
    return p.parse_args(argv)


def rate_points(checkpoints: list[Path], qualities: list[float] | None) -> list[tuple[Path, float | None]]:
    """(checkpoint, quality) of every rate point: a variable-rate checkpoint's qualities, else its one rate."""
    points = []
    for ckpt in checkpoints:
        levels = (lic_common.load_checkpoint(ckpt)["config"].get("quality_lambdas") or ())
        chosen = qualities or [float(q) for q in range(1, len(levels) + 1, 2)]
        points += [(ckpt, q) for q in chosen] if levels else [(ckpt, None)]
    return points


def compare(checkpoint: Path, image: Path, out: Path, quality: float | None = None) -> tuple[list[dict], list[torch.Tensor]]:
    """Our file for one rate point and photograph, and JPEG / WebP at the same size: a row each
    (image, checkpoint, codec, setting, bytes, bpp, psnr, ms_ssim) and the decoded pictures."""
    label = checkpoint.stem if quality is None else f"{checkpoint.stem}@q{quality:g}"
    stem = f"{image.stem}_{label}"
    rate = [] if quality is None else ["--quality", str(quality)]
    bk.main(["compress", str(image), str(out / f"{stem}.bksd"), "--checkpoint", str(checkpoint), *rate])
    bk.main(["decompress", str(out / f"{stem}.bksd"), str(out / f"{stem}.png"), "--checkpoint", str(checkpoint)])
    x = lic_common.load_image(image)
    n_bytes = (out / f"{stem}.bksd").stat().st_size

    def row(codec: str, setting: str, size: int, x_hat: torch.Tensor) -> dict:
        psnr, msssim = image_metrics(x, x_hat)
        return {"image": image.name, "checkpoint": label, "codec": codec, "setting": setting, "bytes": size,
                "bpp": 8 * size / (x.shape[-1] * x.shape[-2]), "psnr": psnr, "ms_ssim": msssim}  # fmt: skip

    ours = lic_common.load_image(out / f"{stem}.png")
    rows, pictures = [row("diffusion-hyperprior", label, n_bytes, ours)], [ours]
    for fmt in ("JPEG", "WEBP"):
        quality, size, x_hat = same_size_classical(x, fmt, n_bytes)
        rows.append(row(fmt.lower(), f"q{quality}", size, x_hat))
        pictures.append(x_hat)
    return rows, pictures


def mean_curves(rows: list[dict]) -> dict[str, dict]:
    """Per codec, one point per checkpoint: bpp, PSNR and MS-SSIM averaged over the photographs
    (JPEG and WebP matched to our file size photograph by photograph)."""
    curves = {}
    for codec in dict.fromkeys(r["codec"] for r in rows):
        c = curves.setdefault(codec, {"name": codec, "results": {"bpp": [], "psnr-rgb": [], "ms-ssim-rgb": []}})["results"]
        for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
            pts = [r for r in rows if r["codec"] == codec and r["checkpoint"] == ckpt]
            for key, field in (("bpp", "bpp"), ("psnr-rgb", "psnr"), ("ms-ssim-rgb", "ms_ssim")):
                c[key].append(sum(r[field] for r in pts) / len(pts))
    return curves


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train_dir, test_photos = write_sample_photos(out / "photos")
    images = [Path(i) for i in args.images] if args.images else test_photos
    checkpoints = [Path(c) for c in args.checkpoint] if args.checkpoint else sorted((ROOT / "reference_checkpoints").glob("*.pth"))
    if not checkpoints:
        print(f"no reference checkpoints: training a small codec for {args.train_minutes} CPU-minute(s) on {train_dir}")
        checkpoints = [train_quick_codec(train_dir, out / "codec_run", args.train_minutes)]
    points = rate_points(checkpoints, args.qualities)
    shown = points[len(points) // 2]
    rows = []
    for image in images:
        pictures = [lic_common.load_image(image)]
        for point in points:
            r, p = compare(point[0], image, out, point[1])
            rows += r
            pictures += p if point == shown else []
        side_by_side(pictures, out / f"side_by_side_{image.stem}.png")
    plot_rd(mean_curves(rows), out / "rd_plot.png",
            title=f"mean over {len(images)} photographs; JPEG and WebP at the size of each of our files")  # fmt: skip

    print(f"\npictures (original, ours with {shown[0].stem}{'' if shown[1] is None else f' at quality {shown[1]:g}'}, JPEG and WebP at that size): {out}/side_by_side_*.png; "
          f"RD plot: {out / 'rd_plot.png'}")  # fmt: skip
    print(f"{'image':<14}{'codec':<22}{'setting':<36}{'bytes':>8}{'bpp':>8}{'PSNR dB':>9}{'MS-SSIM':>9}")
    for r in rows:
        print(f"{r['image']:<14}{r['codec']:<22}{r['setting']:<36}{r['bytes']:>8}{r['bpp']:>8.3f}{r['psnr']:>9.2f}{r['ms_ssim']:>9.4f}")
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])

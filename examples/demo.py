"""The demo: compress a photograph with the diffusion-hyperprior codec, next to JPEG and WebP.

Offline and on the CPU. With the reference checkpoints in ``reference_checkpoints/`` (one per
rate point, trained by benchmarks/rd_benchmark.py) it uses them; otherwise it first trains a
small codec for ``--train_minutes`` on photographs that ship with scikit-image. For each
checkpoint it writes a compressed file, decodes it, and compares bpp / PSNR / MS-SSIM with JPEG and
WebP at the same file size (the largest quality whose file is no larger than ours); it saves a
side-by-side picture and an RD plot.

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

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
TEST_PHOTO = "chelsea"


def write_sample_photos(folder: Path) -> tuple[Path, Path]:
    """scikit-image's bundled photographs as PNG: a training folder and one held-out test photo."""
    import skimage.data

    (folder / "train").mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / "train" / f"{name}.png")
    test = folder / f"{TEST_PHOTO}.png"
    Image.fromarray(getattr(skimage.data, TEST_PHOTO)()).save(test)
    return folder / "train", test


def train_quick_codec(data: Path, out: Path, minutes: float) -> Path:
    """A small from-scratch codec trained for a few minutes by the project's training script."""
    argv = ["--data_path", str(data), "--output_dir", str(out), "--N", "64", "--M", "96",
            "--diffusion_steps", "2", "--unet_channels", "32", "--image_size", "128", "--batch_size", "8",
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
    p.add_argument("--train_minutes", type=float, default=2.0, help="training CPU-minutes (all threads) when there is no checkpoint")
    p.add_argument("--image", default=None, help="photograph to compress (default: scikit-image's 'chelsea')")
    return p.parse_args(argv)


def compare(checkpoint: Path, image: Path, out: Path) -> list[tuple]:
    """Our file for one checkpoint, and JPEG / WebP at the same size: rows of
    (codec, setting, bytes, PSNR, MS-SSIM) and the decoded pictures."""
    stem = checkpoint.stem
    bk.main(["compress", str(image), str(out / f"{stem}.bksd"), "--checkpoint", str(checkpoint)])
    bk.main(["decompress", str(out / f"{stem}.bksd"), str(out / f"{stem}.png"), "--checkpoint", str(checkpoint)])
    x = lic_common.load_image(image)
    n_bytes = (out / f"{stem}.bksd").stat().st_size
    ours = lic_common.load_image(out / f"{stem}.png")
    rows, pictures = [("diffusion-hyperprior", stem, n_bytes, *image_metrics(x, ours))], [ours]
    for fmt in ("JPEG", "WEBP"):
        quality, size, x_hat = same_size_classical(x, fmt, n_bytes)
        rows.append((fmt.lower(), f"q{quality}", size, *image_metrics(x, x_hat)))
        pictures.append(x_hat)
    return rows, pictures


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train_dir, test_photo = write_sample_photos(out / "photos")
    image = Path(args.image) if args.image else test_photo
    checkpoints = [Path(c) for c in args.checkpoint] if args.checkpoint else sorted((ROOT / "reference_checkpoints").glob("*.pth"))
    if not checkpoints:
        print(f"no reference checkpoints: training a small codec for {args.train_minutes} CPU-minute(s) on {train_dir}")
        checkpoints = [train_quick_codec(train_dir, out / "codec_run", args.train_minutes)]
    x = lic_common.load_image(image)
    pixels = x.shape[-1] * x.shape[-2]
    rows, pictures = [], [x]
    for ckpt in checkpoints:
        r, p = compare(ckpt, image, out)
        rows += r
        pictures += p if len(checkpoints) == 1 or ckpt == checkpoints[len(checkpoints) // 2] else []
    side_by_side(pictures, out / "side_by_side.png")
    curves = {}
    for name, setting, size, psnr, msssim in rows:
        c = curves.setdefault(name, {"name": name, "results": {"bpp": [], "psnr-rgb": [], "ms-ssim-rgb": []}})["results"]
        c["bpp"].append(8 * size / pixels)
        c["psnr-rgb"].append(psnr)
        c["ms-ssim-rgb"].append(msssim)
    plot_rd(curves, out / "rd_plot.png", title=f"{image.name}: JPEG and WebP at the size of each of our files")

    print(f"\n{image.name}, {x.shape[-1]}x{x.shape[-2]}; pictures: {out / 'side_by_side.png'} (original, ours, JPEG, WebP), "
          f"RD plot: {out / 'rd_plot.png'}")  # fmt: skip
    print(f"{'codec':<22}{'setting':<36}{'bytes':>8}{'bpp':>8}{'PSNR dB':>9}{'MS-SSIM':>9}")
    for name, setting, size, psnr, msssim in rows:
        print(f"{name:<22}{setting:<36}{size:>8}{8 * size / pixels:>8.3f}{psnr:>9.2f}{msssim:>9.4f}")
    return {"rows": [dict(zip(("codec", "setting", "bytes", "psnr", "ms_ssim"), r)) | {"bpp": 8 * r[2] / pixels} for r in rows]}


if __name__ == "__main__":
    main(sys.argv[1:])

"""The demo: compress a photograph with the diffusion-hyperprior codec, next to JPEG and WebP.

Offline and on the CPU. With reference checkpoints in ``reference_checkpoints/`` it uses them;
otherwise it first trains a small codec for ``--train_minutes`` on photographs that ship with
scikit-image. It then writes a compressed file, decodes it, and compares bpp / PSNR / MS-SSIM with
JPEG and WebP at the same file size (the largest quality whose file is no larger than ours), and
saves a side-by-side picture.

    python examples/demo.py --output_dir demo_output
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as train  # noqa: E402
from evaluate_bk_sdm_compression import image_metrics  # noqa: E402

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
            "--lambda_rate", "2e-3", "--time_budget", str(minutes), "--num_workers", "0", "--val_fraction", "0.2",
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
    with Image.open(io.BytesIO(data)) as dec:
        return quality, len(data), lic_common.pil_to_tensor(dec.convert("RGB"))


def side_by_side(images: list[torch.Tensor], path: Path) -> None:
    row = torch.cat([torch.nn.functional.pad(t, (4, 4, 4, 4), value=1.0) for t in images], dim=-1)
    lic_common.save_image(row, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default=str(ROOT / "demo_output"), help="where everything is written")
    p.add_argument("--checkpoint", default=None, help="codec checkpoint to use (default: a reference one, else train)")
    p.add_argument("--train_minutes", type=float, default=1.0, help="training time when there is no checkpoint")
    p.add_argument("--image", default=None, help="photograph to compress (default: scikit-image's 'chelsea')")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train_dir, test_photo = write_sample_photos(out / "photos")
    image = Path(args.image) if args.image else test_photo
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        print(f"no checkpoint given: training a small codec for {args.train_minutes} minute(s) on {train_dir}")
        checkpoint = train_quick_codec(train_dir, out / "codec_run", args.train_minutes)
    bk.main(["compress", str(image), str(out / "photo.bksd"), "--checkpoint", str(checkpoint)])
    bk.main(["decompress", str(out / "photo.bksd"), str(out / "photo_decoded.png"), "--checkpoint", str(checkpoint)])

    x = lic_common.load_image(image)
    pixels = x.shape[-1] * x.shape[-2]
    n_bytes = (out / "photo.bksd").stat().st_size
    rows = [("diffusion-hyperprior", "", n_bytes, *image_metrics(x, lic_common.load_image(out / "photo_decoded.png")))]
    pictures = [x, lic_common.load_image(out / "photo_decoded.png")]
    for fmt in ("JPEG", "WEBP"):
        quality, size, x_hat = same_size_classical(x, fmt, n_bytes)
        rows.append((fmt.lower(), f"q{quality}", size, *image_metrics(x, x_hat)))
        pictures.append(x_hat)
    side_by_side(pictures, out / "side_by_side.png")

    print(f"\n{image.name}, {x.shape[-1]}x{x.shape[-2]}; left to right in {out / 'side_by_side.png'}: original, " + ", ".join(r[0] for r in rows))
    print(f"{'codec':<22}{'setting':<9}{'bytes':>8}{'bpp':>8}{'PSNR dB':>9}{'MS-SSIM':>9}")
    for name, setting, size, psnr, msssim in rows:
        print(f"{name:<22}{setting:<9}{size:>8}{8 * size / pixels:>8.3f}{psnr:>9.2f}{msssim:>9.4f}")
    return {name: {"bytes": size, "bpp": 8 * size / pixels, "psnr": psnr, "ms_ssim": msssim} for name, _, size, psnr, msssim in rows}


if __name__ == "__main__":
    main(sys.argv[1:])

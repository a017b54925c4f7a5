"""Load a trained codec checkpoint and measure it on a folder of images, with the Python API.

The evaluation script (evaluate_bk_sdm_compression.py) does this for many checkpoints and codecs
at once and writes JSON, CSV, BD-rates and plots. This shows the few calls it is built on:

    python examples/evaluate_example.py --checkpoint outputs/run1/best_checkpoint.pth --data_path ../shared/data/kodak
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lic_common  # noqa: E402
from bk_sdm_compression import decode_image, encode_image, load_codec  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="codec checkpoint from train_bk_sdm_compression.py")
    p.add_argument("--data_path", required=True, help="folder of images")
    p.add_argument("--diffusion_steps", type=int, default=None, help="reverse steps: the checkpoint's (default) or 0")
    args = p.parse_args(argv)

    model, ckpt = load_codec(args.checkpoint, "cpu", diffusion_steps=args.diffusion_steps)
    print(f"{args.checkpoint}: {ckpt['config']['N']}/{ckpt['config']['M']} channels, "
          f"{model.inference_steps} reverse steps, mode {model.config.mode}")  # fmt: skip
    rows = []
    for path in lic_common.list_images(args.data_path):
        x = lic_common.load_image(path)
        start = time.perf_counter()
        data = encode_image(model, x)  # the bytes of a complete file, header included
        x_hat = decode_image(model, data)
        seconds = time.perf_counter() - start
        bpp = 8 * len(data) / (x.shape[-2] * x.shape[-1])
        with torch.no_grad():
            estimate = lic_common.bpp_from_likelihoods(model(x[None])["likelihoods"], x.shape[-2] * x.shape[-1]).item()
        psnr, msssim = lic_common.psnr(x, x_hat), lic_common.ms_ssim(x[None], x_hat[None]).item()
        rows.append((bpp, estimate, psnr, msssim))
        print(f"{path.name:>16}  {bpp:.4f} bpp (estimate {estimate:.4f})  PSNR {psnr:.2f} dB  MS-SSIM {msssim:.4f}  {seconds:.2f} s")
    mean = [sum(col) / len(rows) for col in zip(*rows)]
    print(f"{'mean':>16}  {mean[0]:.4f} bpp (estimate {mean[1]:.4f})  PSNR {mean[2]:.2f} dB  MS-SSIM {mean[3]:.4f}")
    return dict(zip(("bpp", "bpp_estimate", "psnr", "ms_ssim"), mean))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Cross-device check of the exact entropy model: files made on the CPU decode on CUDA and files
made on CUDA decode on the CPU, with TF32 on and off, to the same latent bit for bit.

For each checkpoint and image: encode on every device setting, decode every file on every other
setting through ``decode_image`` (which refuses a file whose decoded latent differs from the
encoder's), and record refusals, how many files differ between encoder settings (allowed: the
analysis transform is floating point, so an encoder on another device may pick other symbols;
each file must still decode alike everywhere), and the lowest PSNR between two decodes of one
file (the synthesis transform is floating point too).

    python benchmarks/exact_cuda_check.py --kodak ../shared/data/kodak --max_images 6

Without a GPU, ``--devices cpu`` runs the same checks on the CPU alone (what the tests run).
Prints a summary and writes it as JSON to ``--output`` when given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import lic_common  # noqa: E402

SHIPPED = sorted((ROOT / "reference_checkpoints").glob("diffusion-hyperprior-lambda*.pth"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=[str(c) for c in SHIPPED], help="exact codec checkpoints")
    p.add_argument("--kodak", required=True, help="folder of images to code")
    p.add_argument("--max_images", type=int, default=6, help="first images only")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"], help="devices to code on")
    p.add_argument("--output", default=None, help="JSON file for the summary")
    args = p.parse_args(argv)
    if "cuda" in args.devices and not torch.cuda.is_available():
        p.error("no CUDA device here: pass --devices cpu for the CPU-only run")
    if args.max_images < 1:
        p.error("--max_images must be >= 1")
    return args


def settings(devices: list[str]) -> list[tuple[str, bool]]:
    """(device, TF32) pairs: TF32 matters on CUDA only."""
    return [(d, tf32) for d in devices for tf32 in ((False, True) if d == "cuda" else (False,))]


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def check(checkpoint: str, images: list[Path], devices: list[str]) -> dict:
    models = {d: bk.load_codec(checkpoint, d)[0] for d in devices}
    model_id = models[devices[0]].fingerprint()
    refused, lowest, differing_files, seconds = [], math.inf, 0, {}
    for path in images:
        x = lic_common.load_image(path)
        files = {}
        for device, tf32 in settings(devices):
            set_tf32(tf32)
            start = time.perf_counter()
            files[(device, tf32)] = bk.encode_image(models[device], x, model_id=model_id)
            seconds.setdefault(f"encode {device}", []).append(time.perf_counter() - start)
        differing_files += len(set(files.values())) - 1
        for (enc, data), (device, tf32) in itertools.product(files.items(), settings(devices)):
            set_tf32(tf32)
            try:
                start = time.perf_counter()
                x_hat = bk.decode_image(models[device], data, model_id=model_id).cpu()
                seconds.setdefault(f"decode {device}", []).append(time.perf_counter() - start)
            except bk.BitstreamError as e:
                refused.append(f"{path.name}: made on {enc}, decoded on {(device, tf32)}: {e}")
                continue
            ref = bk.decode_image(models[enc[0]], data, model_id=model_id).cpu()
            mse = (x_hat - ref).pow(2).mean().item()
            lowest = min(lowest, math.inf if mse == 0 else 10 * math.log10(1 / mse))
    set_tf32(False)
    return {"images": len(images), "settings": [f"{d}{' tf32' if t else ''}" for d, t in settings(devices)],
            "refused": refused, "files_differing_between_settings": differing_files,
            "lowest_psnr_between_decodes": lowest,
            "seconds_per_image": {k: sum(v) / len(v) for k, v in seconds.items()}}  # fmt: skip


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    images = lic_common.list_images(args.kodak)[: args.max_images]
    if not images:
        raise SystemExit(f"error: no images in {args.kodak}")
    summary = {}
    for ck in args.checkpoints:
        summary[Path(ck).name] = result = check(ck, images, args.devices)
        print(f"{Path(ck).name}: {len(result['refused'])} refused, {result['files_differing_between_settings']} files "
              f"differing, lowest PSNR between decodes {result['lowest_psnr_between_decodes']:.1f} dB, "
              f"{result['seconds_per_image']}", flush=True)  # fmt: skip
    if args.output:
        lic_common.write_text_atomic(args.output, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

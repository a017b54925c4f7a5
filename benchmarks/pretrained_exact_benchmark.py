"""BK-SDM's pretrained U-Net in the exact integer form: what it costs in bits and in time.

Two measurements, one command:

- **rate cost of the integer form** (``--stage rd``): a codec on a BK-SDM-shaped folder of random
  weights (a VAE of downsampling factor 8 and 4 latent channels, as BK-SDM's, and a small
  ``UNet2DConditionModel`` with cross-attention) is trained by ``train_bk_sdm_compression.py
  --use_pretrained_vae --use_pretrained_unet`` on the training photographs, then every evaluation
  image is coded twice on the same weights: by the exact integer entropy model (a complete file,
  decoded back and checked) and by the floating-point one it replaces (format 2's coder: the same
  reverse chain in float32). The ratio of their bytes is the integer form's rate cost; the float
  forward's likelihood estimate is reported beside them;
- **cost at a real size** (``--stage size``): a ``UNet2DConditionModel`` built with random weights
  from BK-SDM-Small's published configuration (``unet_small_v1.json``, and the SD 2.x-based
  ``unet_small_v2.json`` with linear projections and per-block head widths), adapted as the codec
  adapts it (4 latent channels), one reverse step on a Kodak-size latent (64 x 96): the exact
  integer step against the float32 one (``DiffusionHyperprior._predict``), seconds and peak
  resident memory, each in its own process with ``--threads`` threads.

    python benchmarks/pretrained_exact_benchmark.py --train ../shared/data/train --kodak ../shared/data/kodak \\
        --bk_sdm_configs ../shared/data/bk-sdm

Writes ``pretrained_exact.json`` and ``pretrained_exact.md`` to ``--output_dir``; the trained
codec and the per-image results stay in ``--work_dir`` (a second run resumes from them).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# BK-SDM's VAE shape (factor 8, 4 latent channels) at a tiny width, and a small cross-attention U-Net
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 32, 32), latent_channels=4, norm_num_groups=8, sample_size=64)  # fmt: skip
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, layers_per_block=1, attention_head_dim=4)  # fmt: skip
SIZE_LATENT = (64, 96)  # a Kodak image's latent under BK-SDM's VAE (512 x 768 / 8)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=("all", "rd", "size"), default="all", help="which measurement to run")
    p.add_argument("--train", default=str(ROOT.parent / "shared" / "data" / "train"), help="training photographs")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="evaluation images")
    p.add_argument("--max_images", type=int, default=8, help="evaluation images coded (the first ones)")
    p.add_argument("--train_steps", type=int, default=300, help="training steps of the tiny codec")
    p.add_argument("--image_size", type=int, default=128, help="training crop size of the tiny codec")
    p.add_argument("--bk_sdm_configs", default=str(ROOT.parent / "shared" / "data" / "bk-sdm"),
                   help="folder of BK-SDM's U-Net configurations (unet_small_v1.json, unet_small_v2.json)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the real-size step")
    p.add_argument("--latent_size", type=int, nargs=2, default=list(SIZE_LATENT), metavar=("H", "W"),
                   help="latent of the real-size step (a Kodak image's under BK-SDM's VAE)")
    p.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs" / "pretrained_exact"), help="trained codec and per-image cache")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and Markdown go")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "exact|float:CONFIG.json"
    args = p.parse_args(argv)
    if args.max_images < 1 or args.train_steps < 1 or args.threads < 1 or args.image_size < 64 or min(args.latent_size) < 8:
        p.error("--max_images, --train_steps and --threads must be >= 1, --image_size >= 64, --latent_size >= 8")
    return args


# ---- Rate cost of the integer form ----


def train_codec(args) -> Path:
    import bk_sdm_compression as bk
    import train_bk_sdm_compression as tr

    work = Path(args.work_dir)
    folder = work / "bk-sdm-random"
    if not (folder / "unet").is_dir():
        bk.save_random_bk_sdm(folder, TINY_VAE, TINY_UNET)
    run = work / "run"
    best = run / "best_checkpoint.pth"
    if not best.is_file() or not (run / "done").is_file():
        tr.main(["--data_path", args.train, "--output_dir", str(run), "--use_pretrained_vae", "--use_pretrained_unet",
                 "--bk_sdm_path", str(folder), "--N", "64", "--diffusion_steps", "4", "--image_size", str(args.image_size),
                 "--val_image_size", str(args.image_size), "--batch_size", "8", "--num_workers", "0", "--max_steps", str(args.train_steps),
                 "--val_interval", "1000", "--lambda_rate", "0.01", "--no-amp", "--no-progress"])  # fmt: skip
        (run / "done").write_text("trained\n")
    return best


def measure_rd(args, checkpoint: Path) -> dict:
    import torch

    import bk_sdm_compression as bk
    import exact_benchmark as eb
    import lic_common

    cache_path = Path(args.work_dir) / "rd_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    images = lic_common.list_images(args.kodak)[: args.max_images]
    model, _ = bk.load_codec(checkpoint)
    model_id = model.fingerprint()
    for p in images:
        if p.name in cache:
            continue
        x = lic_common.load_image(p)
        pixels = x.shape[-1] * x.shape[-2]
        row = {}
        for name, fn in (("float", lambda: eb.float_code(model, x)), ("exact", lambda: eb.exact_code(model, x, model_id))):
            size, x_hat, enc, dec = fn()
            row[name] = {"bpp": 8 * size / pixels, "psnr": lic_common.psnr(x, x_hat), "encode_s": enc, "decode_s": dec}
        with torch.no_grad():
            out = model(x[None])
        bits = sum(-torch.log2(v.double()).sum().item() for v in out["likelihoods"].values())
        row["estimate_bpp"] = bits / pixels
        cache[p.name] = row
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"{p.name}: exact {row['exact']['bpp']:.4f} bpp, float {row['float']['bpp']:.4f} bpp, "
              f"estimate {row['estimate_bpp']:.4f} bpp; exact encode {row['exact']['encode_s']:.1f} s", flush=True)  # fmt: skip
    rows = [cache[p.name] for p in images]
    strings = model.config.diffusion_steps + 1
    exact_overhead = bk._HEADER.size + strings * bk._LENGTH.size + bk._CRC.size  # the file around the strings
    float_overhead = 25 + strings * 4 + 4  # format 2's header, string lengths and CRC (exact_benchmark.float_code)
    bits = {"exact": 0.0, "float": 0.0, "exact_payload": 0.0, "float_payload": 0.0, "estimate": 0.0}
    for p in images:
        pixels = math.prod(lic_common.load_image(p).shape[-2:])
        row = cache[p.name]
        for kind, overhead in (("exact", exact_overhead), ("float", float_overhead)):
            bits[kind] += row[kind]["bpp"] * pixels
            bits[f"{kind}_payload"] += row[kind]["bpp"] * pixels - 8 * overhead
        bits["estimate"] += row["estimate_bpp"] * pixels
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT) else checkpoint.name,
        "images": len(rows),
        "diffusion_steps": model.config.diffusion_steps,
        "exact_bpp": statistics.mean(r["exact"]["bpp"] for r in rows),
        "float_bpp": statistics.mean(r["float"]["bpp"] for r in rows),
        "estimate_bpp": statistics.mean(r["estimate_bpp"] for r in rows),
        "exact_over_float_bytes": bits["exact"] / bits["float"] - 1,
        "exact_over_float_payload": bits["exact_payload"] / bits["float_payload"] - 1,
        "exact_payload_over_estimate": bits["exact_payload"] / bits["estimate"] - 1,
        "float_payload_over_estimate": bits["float_payload"] / bits["estimate"] - 1,
        "psnr_exact": statistics.mean(r["exact"]["psnr"] for r in rows),
        "psnr_float": statistics.mean(r["float"]["psnr"] for r in rows),
        "exact_encode_s": statistics.mean(r["exact"]["encode_s"] for r in rows),
        "exact_decode_s": statistics.mean(r["exact"]["decode_s"] for r in rows),
        "float_encode_s": statistics.mean(r["float"]["encode_s"] for r in rows),
        "float_decode_s": statistics.mean(r["float"]["decode_s"] for r in rows),
    }


# ---- Cost at a real size ----


def real_size_codec(config_path: str, exact: bool):
    """The codec around a random U-Net of ``config_path`` (adapted to 4 latent channels, an adapter
    of its cross-attention width); with ``exact``, calibrated on a small random latent and its exact
    form built."""
    import torch
    import torch.nn as nn
    from diffusers import UNet2DConditionModel

    import bk_sdm_compression as bk

    torch.manual_seed(0)
    config = {k: v for k, v in json.loads(Path(config_path).read_text()).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config).eval()
    M = unet.config.in_channels
    bk.adapt_pretrained_unet(unet, M)
    dim = unet.config.cross_attention_dim
    adapter = bk.CrossAttentionAdapter(2 * M, dim[0] if isinstance(dim, (list, tuple)) else dim, 8)
    with torch.no_grad():  # the new layers as training would leave them: off zero
        for layer in (unet.conv_in, unet.conv_out):
            layer.weight.normal_(0, 0.02)
    cfg = bk.CodecConfig(N=128, M=M, diffusion_steps=4, use_pretrained_vae=True, use_pretrained_unet=True,
                         bk_sdm_path=f"random weights: {Path(config_path).name}")  # fmt: skip
    model = bk.DiffusionHyperprior(cfg, nn.Identity(), nn.Identity(), unet, adapter, 8, 1000).eval()
    if not exact:
        return model
    inputs = step_inputs(model, (16, 24))
    ops = bk._FloatOps(bk.unet_time_tables(unet, model.step_timesteps[inputs["step"]]))
    with torch.no_grad():
        x = torch.cat([inputs["innovation"], inputs["known"].double(), inputs["mu0"], inputs["sigma0"].log()], 1)
        context = bk._walk_adapter(ops, adapter, ops.input("adapter.in", torch.cat([inputs["mu0"], inputs["sigma0"].log()], 1)))
        bk._walk_unet(ops, unet, ops.input("unet.in", x), context)
    model.calibration = ops.maxima
    model.update(force=True)
    return model


def step_inputs(model, size: tuple[int, int]) -> dict:
    """Reverse step 1 (the anchors of the first channel slice known) on a random latent."""
    import torch

    g = torch.Generator().manual_seed(1)
    M = model.config.M
    mu0 = torch.randn(1, M, *size, generator=g, dtype=torch.float64)
    sigma0 = torch.rand(1, M, *size, generator=g, dtype=torch.float64) + 0.2
    y = mu0 + sigma0 * torch.randn(1, M, *size, generator=g, dtype=torch.float64)
    known = (model.reveal_groups(*size, torch.device("cpu")) < 1)[None]
    return {"mu0": mu0, "sigma0": sigma0, "state": torch.where(known, y.round(), mu0), "known": known,
            "innovation": torch.where(known, (y.round() - mu0) / sigma0, 0), "step": torch.tensor([1])}  # fmt: skip


def size_worker(spec: str, threads: int, latent_size: tuple[int, int]) -> None:
    """One process, one measurement: prints a JSON line {seconds, peak_rss_gb, ...}."""
    import torch

    torch.set_num_threads(threads)
    kind, config_path = spec.split(":", 1)
    t0 = time.perf_counter()
    model = real_size_codec(config_path, exact=kind == "exact")
    build_s = time.perf_counter() - t0
    inputs = step_inputs(model, tuple(latent_size))
    parameters = sum(p.numel() for p in model.unet.parameters())
    with torch.no_grad():
        t0 = time.perf_counter()
        if kind == "exact":
            ex = model.exact
            f = ex.f_latent
            mu0 = torch.round(inputs["mu0"] * 2**f).long()
            sigma0 = torch.round(inputs["sigma0"] * 2**f).long().clamp(min=ex.scale_floor)
            state = torch.round(inputs["state"] * 2**f).long()
            ex.predict(model.unet, model.adapter, state, inputs["known"], inputs["step"], mu0, sigma0, ex.log(sigma0), {})
        else:
            s = {k: v.float() if torch.is_floating_point(v) else v for k, v in inputs.items()}
            model._predict(s["state"], s["known"], s["step"], s["mu0"], s["sigma0"])
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "build_s": build_s, "parameters": parameters}))


def measure_size(args) -> dict:
    out = {}
    for name in ("unet_small_v1.json", "unet_small_v2.json"):
        path = Path(args.bk_sdm_configs) / name
        if not path.is_file():
            print(f"note: {path} not found, skipped", file=sys.stderr)
            continue
        row = {}
        for kind in ("float", "exact"):
            r = subprocess.run([sys.executable, __file__, "--worker", f"{kind}:{path}", "--threads", str(args.threads),
                                "--latent_size", *map(str, args.latent_size)], capture_output=True, text=True)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"{kind} step of {name} failed:\n{r.stderr[-2000:]}")
            row[kind] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name} {kind}: {row[kind]['seconds']:.1f} s, peak {row[kind]['peak_rss_gb']:.2f} GiB", flush=True)
        row["exact_over_float_time"] = row["exact"]["seconds"] / row["float"]["seconds"]
        out[name] = row
    return out


# ---- Report ----


def markdown(result: dict) -> str:
    lines = ["# BK-SDM's U-Net in the exact integer form", ""]
    rd = result.get("rd")
    if rd:
        lines += [
            f"Rate cost on {rd['images']} Kodak images, a tiny pretrained-path codec ({rd['diffusion_steps']} reverse steps, "
            "random BK-SDM-shaped weights, trained by the training script):", "",
            "| coder | bpp (real bytes) | PSNR (dB) | encode s | decode s |", "| --- | --- | --- | --- | --- |",
            f"| exact integer | {rd['exact_bpp']:.4f} | {rd['psnr_exact']:.2f} | {rd['exact_encode_s']:.2f} | {rd['exact_decode_s']:.2f} |",
            f"| float (format 2) | {rd['float_bpp']:.4f} | {rd['psnr_float']:.2f} | {rd['float_encode_s']:.2f} | {rd['float_decode_s']:.2f} |",
            "", f"- whole files, exact over float: **{100 * rd['exact_over_float_bytes']:+.3f}%** (the exact file's header holds "
            "14 more bytes: the latent and hyper-latent digests and the quality);",
            f"- the strings alone (the integer form's own cost), exact over float: **{100 * rd['exact_over_float_payload']:+.3f}%**;",
            f"- the strings against the float forward's likelihood estimate ({rd['estimate_bpp']:.4f} bpp): exact "
            f"{100 * rd['exact_payload_over_estimate']:+.3f}%, float {100 * rd['float_payload_over_estimate']:+.3f}% (the range "
            "coder's flushes and the scale table's rounding, the same in both).", "",
        ]  # fmt: skip
    size = result.get("size")
    if size:
        h, w = result.get("latent_size", SIZE_LATENT)
        lines += [f"One reverse step at a {h}x{w} latent, random weights of BK-SDM's configurations, "
                  f"{result['threads']} CPU threads, each in its own process:", "",
                  "| configuration | parameters | float32 s | exact s | exact / float | float32 peak GiB | exact peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, r in size.items():
            lines.append(f"| {name} | {r['exact']['parameters'] / 1e6:.0f}M | {r['float']['seconds']:.1f} | {r['exact']['seconds']:.1f} | "
                         f"{r['exact_over_float_time']:.1f}x | {r['float']['peak_rss_gb']:.2f} | {r['exact']['peak_rss_gb']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.worker:
        size_worker(args.worker, args.threads, args.latent_size)
        return {}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    out_json = Path(args.output_dir) / "pretrained_exact.json"
    result = json.loads(out_json.read_text()) if out_json.is_file() else {}
    result["threads"], result["latent_size"] = args.threads, args.latent_size
    if args.stage in ("all", "rd"):
        result["rd"] = measure_rd(args, train_codec(args))
    if args.stage in ("all", "size"):
        result["size"] = measure_size(args)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    (Path(args.output_dir) / "pretrained_exact.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

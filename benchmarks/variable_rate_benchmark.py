"""Variable-rate benchmark: one checkpoint's curve against the fixed-rate checkpoints', and the target-size search.

On Kodak and on photographs the project never trained or tuned on (scikit-image's), with real
files (exact entropy model; each file decoded and checked against the encoder's latent digest):
- the variable-rate checkpoint at ``--qualities`` (default: its trained levels), bpp from the
  bytes with the likelihood estimate beside it, PSNR and MS-SSIM;
- BD-rate (PSNR) of that curve against the fixed-rate curve (one checkpoint per rate point, the
  ``exact`` curves of ``exact_benchmark.py``'s results, or measured here with
  ``--fixed_checkpoints``), over the range the two share, and against JPEG and WebP measured here;
- the target-size search (``bk_sdm_compression.encode_to_target``) on every Kodak image at each
  ``--target_bpp``: how many files land within 2% of the asked size, encodes taken, seconds.

Writes ``--output`` (JSON), the same name with ``.md`` (tables) and ``.png`` (Kodak plot).

    python benchmarks/variable_rate_benchmark.py --checkpoint RUN/diffusion-hyperprior-variable-rate.pth
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TARGETS = (0.25, 0.5, 1.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="variable-rate codec checkpoint")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="Kodak images")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True, help="also scikit-image's photographs")
    p.add_argument("--qualities", type=float, nargs="+", default=None, help="qualities measured (default: the trained levels)")
    p.add_argument("--fixed_curve", default=str(ROOT / "benchmarks" / "results" / "exact.json"),
                   help="exact_benchmark.py's results: the fixed-rate checkpoints' exact curves per image set")
    p.add_argument("--fixed_checkpoints", nargs="*", default=None, help="measure these fixed-rate checkpoints here instead of --fixed_curve")
    p.add_argument("--target_bpp", type=float, nargs="*", default=list(DEFAULT_TARGETS), help="target-size search: asked bpp on Kodak")
    p.add_argument("--max_encodes", type=int, default=8, help="target-size search: encodes allowed")
    p.add_argument("--max_images", type=int, default=0, help="first images of each set only (0: all)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "variable_rate.json"), help="JSON with every figure")
    args = p.parse_args(argv)
    if args.max_images < 0 or args.threads < 1 or args.max_encodes < 1 or any(b <= 0 for b in args.target_bpp):
        p.error("--max_images must be >= 0, --threads and --max_encodes >= 1, --target_bpp > 0")
    return args


def code_set(model, images: dict, quality: float | None) -> list[dict]:
    """Every image through a real file: bytes, the estimate, PSNR, MS-SSIM, seconds."""
    import torch

    import bk_sdm_compression as bk
    import lic_common

    model_id, rows = model.fingerprint(), []
    for name, x in images.items():
        start = time.perf_counter()
        data = bk.encode_image(model, x, model_id=model_id, quality=quality)
        encoded = time.perf_counter()
        x_hat = bk.decode_image(model, data, model_id=model_id)  # checks the latent digest
        decoded = time.perf_counter()
        with torch.no_grad():
            out = model(x[None], **({} if quality is None else {"quality": quality}))
        pixels = x.shape[-1] * x.shape[-2]
        estimate = sum(-p.double().log2().sum().item() for p in out["likelihoods"].values()) / pixels
        rows.append({"image": name, "bpp": 8 * len(data) / pixels, "bpp_estimate": estimate, "psnr": lic_common.psnr(x[None], x_hat[None]),
                     "ms_ssim": lic_common.ms_ssim(x[None], x_hat[None]).item(), "encode_s": encoded - start, "decode_s": decoded - encoded})  # fmt: skip
    return rows


def mean_curve(points: list[list[dict]]) -> dict:
    keys = ("bpp", "bpp_estimate", "psnr", "ms_ssim", "encode_s", "decode_s")
    curve = {k: [statistics.mean(r[k] for r in rows) for rows in points] for k in keys}
    return {"bpp": curve["bpp"], "bpp-estimate": curve["bpp_estimate"], "psnr-rgb": curve["psnr"], "ms-ssim-rgb": curve["ms_ssim"],
            "encoding_time": curve["encode_s"], "decoding_time": curve["decode_s"]}  # fmt: skip


def classical_curve(name: str, images: dict) -> dict:
    import evaluate_bk_sdm_compression as ev
    import lic_common

    points = []
    for q in ev.DEFAULT_QUALITIES[name]:
        codec, rows = ev.PillowCodec(name, q), []
        for x in images.values():
            data, x_hat, _, _ = codec.code(x)
            rows.append({"bpp": 8 * len(data) / (x.shape[-1] * x.shape[-2]), "psnr": lic_common.psnr(x[None], x_hat[None])})
        points.append(rows)
    return {"bpp": [statistics.mean(r["bpp"] for r in p) for p in points], "psnr-rgb": [statistics.mean(r["psnr"] for r in p) for p in points]}


def target_search(model, images: dict, targets: list[float], max_encodes: int) -> dict:
    import bk_sdm_compression as bk

    out = {}
    for bpp in targets:
        rows = []
        for name, x in images.items():
            asked = bpp * x.shape[-1] * x.shape[-2] / 8
            start = time.perf_counter()
            found = bk.encode_to_target(model, x, "size", asked, max_encodes=max_encodes)
            rows.append({"image": name, "asked_bytes": asked, "bytes": len(found.data), "quality": found.quality, "met": found.met,
                         "encodes": found.encodes, "seconds": time.perf_counter() - start})  # fmt: skip
        out[f"{bpp:g}"] = {
            "within_2pct": sum(r["met"] for r in rows), "images": len(rows), "max_encodes": max(r["encodes"] for r in rows),
            "mean_encodes": statistics.mean(r["encodes"] for r in rows), "mean_seconds": statistics.mean(r["seconds"] for r in rows),
            "worst_error_pct": max(100 * abs(r["bytes"] - r["asked_bytes"]) / r["asked_bytes"] for r in rows), "per_image": rows,
        }  # fmt: skip
    return out


def markdown(result: dict) -> str:
    lines = [f"Variable-rate checkpoint `{result['checkpoint']}` ({result['levels']} levels), real files.", ""]
    for set_name, c in result["curves"].items():
        lines += [f"{set_name} ({result['images'][set_name]} images):", "", "| quality | bpp (file) | bpp (estimate) | PSNR dB | MS-SSIM |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        v = c["variable-rate"]
        for i, q in enumerate(result["qualities"]):
            lines.append(f"| {q:g} | {v['bpp'][i]:.4f} | {v['bpp-estimate'][i]:.4f} | {v['psnr-rgb'][i]:.3f} | {v['ms-ssim-rgb'][i]:.4f} |")
        bd = result["bd_rate"][set_name]
        lines += ["", "BD-rate (PSNR) of the variable-rate curve: " + ", ".join(f"against {k} {v:+.2f}%" for k, v in bd.items()), ""]
    lines += ["Target size on Kodak (search over quality, at most %d encodes):" % result["max_encodes"], "",
              "| asked bpp | within 2% | worst error | mean encodes | most encodes | mean seconds |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for bpp, t in result["target_size"].items():
        lines.append(f"| {bpp} | {t['within_2pct']} of {t['images']} | {t['worst_error_pct']:.2f}% | {t['mean_encodes']:.1f} | "
                     f"{t['max_encodes']} | {t['mean_seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, c in result["curves"]["kodak"].items():
        style = "o-" if name == "variable-rate" else ("s--" if name == "fixed-rate" else ".:")
        ax.plot(c["bpp"], c["psnr-rgb"], style, label=name)
    ax.set(xlabel="bpp (real files)", ylabel="PSNR (dB)", title="Kodak: one variable-rate checkpoint", xlim=(0, 1.6))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    import torch

    import bk_sdm_compression as bk
    import evaluate_bk_sdm_compression as ev
    import lic_common

    torch.set_num_threads(args.threads)
    model, _ = bk.load_codec(args.checkpoint)
    levels = model.config.rate_levels
    if not levels:
        raise SystemExit(f"error: {args.checkpoint} codes at one rate; this benchmark measures a variable-rate checkpoint")
    qualities = args.qualities or [float(q) for q in range(1, levels + 1)]
    files = {"kodak": lic_common.list_images(args.kodak)[: args.max_images or None]}
    scratch = Path(tempfile.mkdtemp(prefix="variable-rate-"))
    if args.unseen:
        files["unseen"] = lic_common.write_sample_photos(scratch / "unseen")[: args.max_images or None]
    fixed_stored = json.loads(Path(args.fixed_curve).read_text()) if not args.fixed_checkpoints else None
    result = {"checkpoint": Path(args.checkpoint).name, "levels": levels, "qualities": qualities, "max_encodes": args.max_encodes,
              "images": {}, "curves": {}, "bd_rate": {}}  # fmt: skip
    for set_name, paths in files.items():
        images = {p.name: lic_common.load_image(p) for p in paths}
        result["images"][set_name] = len(images)
        curves = {"variable-rate": mean_curve([code_set(model, images, q) for q in qualities])}
        if args.fixed_checkpoints:
            curves["fixed-rate"] = mean_curve([code_set(bk.load_codec(c)[0], images, None) for c in args.fixed_checkpoints])
        elif set_name in fixed_stored["curves"] and fixed_stored["sets"][set_name] == sorted(images):
            curves["fixed-rate"] = fixed_stored["curves"][set_name]["exact"]
        for name in ("jpeg", "webp"):
            curves[name] = classical_curve(name, images)
        result["curves"][set_name] = curves
        v = curves["variable-rate"]
        result["bd_rate"][set_name] = {name: ev.bd_rate(c["bpp"], c["psnr-rgb"], v["bpp"], v["psnr-rgb"])
                                       for name, c in curves.items() if name != "variable-rate"}  # fmt: skip
        print(set_name, {k: f"{b:+.2f}%" for k, b in result["bd_rate"][set_name].items()}, flush=True)
    kodak = {p.name: lic_common.load_image(p) for p in files["kodak"]}
    result["target_size"] = target_search(model, kodak, args.target_bpp, args.max_encodes)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lic_common.write_text_atomic(out, json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Encoder effort: what the latent search (``compress --effort E``) buys in rate and costs in time.

Every ``--checkpoints`` rate point codes each of ``--images`` Kodak images (spread evenly over the
24 in name order; all 24 with ``--images 24``) at each ``--efforts`` level, in this process with
``--threads`` threads, with real files: bytes, PSNR and MS-SSIM of the decoded picture, encode and
decode seconds (the codec's own, the model loaded). Each effort's curve (mean bpp and quality over
the images, one point per checkpoint) is compared with effort 0's: BD-rate in PSNR and in MS-SSIM,
mean encode seconds per image and their ratio to effort 0's, and decode time as a ratio to effort
0's files (the decoder is the same; this checks it). JPEG and WebP (Pillow) code the same images,
so every effort's standing against them is measured on the same set.

    python benchmarks/effort_benchmark.py --images 4 --efforts 0 1 2 3 4
    python benchmarks/effort_benchmark.py --unseen --efforts 0 1 --tag _unseen   # scikit-image's photographs

Results are cached per (checkpoint, image, effort) in ``--work_dir`` as they are measured, so an
interrupted run resumes and later runs add efforts or images. Writes ``effort<TAG>.json``,
``.md`` and ``.png`` to ``--output_dir`` from everything cached for the images and efforts asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=sorted(str(c) for c in (ROOT / "reference_checkpoints").glob("*.pth")),
                   help="codec checkpoints, one rate point each (default: the shipped ones)")  # fmt: skip
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="folder of the Kodak images")
    p.add_argument("--images", type=int, default=4, help="Kodak images, spread evenly over the set in name order")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=False,
                   help="code scikit-image's photographs (never seen in training, not Kodak) instead of Kodak images")
    p.add_argument("--efforts", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="effort levels to measure (0 is the anchor)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs" / "effort"), help="the cache of measurements")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON, Markdown and plot go")
    p.add_argument("--tag", default="", help="appended to the output files' names (effort<TAG>.json ...), to keep several runs' summaries")
    args = p.parse_args(argv)
    if args.images < 1 or args.threads < 1 or 0 not in args.efforts or min(args.efforts) < 0:
        p.error("--images and --threads must be >= 1, and --efforts must hold 0 (the anchor) and no negative level")
    return args


def pick_images(folder: str, count: int) -> list[Path]:
    import lic_common

    files = lic_common.list_images(folder)
    if count > len(files):
        raise SystemExit(f"error: --images {count}: {folder} holds {len(files)} images")
    return [files[round(i * len(files) / count)] for i in range(count)]


def measure(args: argparse.Namespace, images: list[Path], cache: dict, cache_path: Path) -> None:
    """Code every (checkpoint, image, effort) not cached yet, saving the cache after each."""
    import torch
    from tqdm import tqdm

    import bk_sdm_compression as bk
    import evaluate_bk_sdm_compression as ev
    import lic_common

    torch.set_num_threads(args.threads)
    jobs = [(c, i, e) for i in images for c in args.checkpoints for e in args.efforts if f"{Path(c).name}|{i.name}|{e}" not in cache]
    models = {}
    for ckpt, image, effort in tqdm(jobs, desc="effort", unit="file", dynamic_ncols=True):
        if ckpt not in models:
            model, _ = bk.load_codec(ckpt, "cpu")
            models[ckpt] = (model, model.fingerprint())
        model, model_id = models[ckpt]
        x, _ = lic_common.read_image(image, keep_8bit=True)
        start = time.perf_counter()
        data = bk.encode_image(model, x, model_id=model_id, effort=effort)
        encode = time.perf_counter() - start
        start = time.perf_counter()
        x_hat = bk.decode_image(model, data, model_id=model_id)
        decode = time.perf_counter() - start
        psnr, msssim = ev.image_metrics(x.float() / 255, x_hat)
        h, w = x.shape[-2:]
        cache[f"{Path(ckpt).name}|{image.name}|{effort}"] = {
            "bpp": 8 * len(data) / (h * w), "psnr": psnr, "ms_ssim": msssim, "encode_seconds": encode, "decode_seconds": decode}
        lic_common.write_bytes_atomic(cache_path, json.dumps(cache, indent=1).encode())


def classical(images: list[Path]) -> dict[str, dict]:
    """JPEG and WebP curves (mean bpp, PSNR, MS-SSIM per quality setting) on ``images``."""
    import evaluate_bk_sdm_compression as ev
    import lic_common

    curves, pictures = {}, [lic_common.read_image(image)[0] for image in images]
    for name in ("jpeg", "webp"):
        points = []
        for q in ev.DEFAULT_QUALITIES[name]:
            codec, rows = ev.PillowCodec(name, q), []
            for x in pictures:
                data, x_hat, _, _ = codec.code(x)
                rows.append((8 * len(data) / (x.shape[-2] * x.shape[-1]), *ev.image_metrics(x, x_hat)))
            points.append([sum(r[k] for r in rows) / len(rows) for k in range(3)])
        curves[name.upper() if name == "jpeg" else "WebP"] = {"bpp": [p[0] for p in points], "psnr": [p[1] for p in points],
                                                               "ms_ssim": [p[2] for p in points]}  # fmt: skip
    return curves


def summarize(args: argparse.Namespace, images: list[Path], cache: dict) -> dict:
    import bk_sdm_compression as bk
    import evaluate_bk_sdm_compression as ev

    curves, times = {}, {}
    for effort in sorted(set(args.efforts)):
        rows = [[cache.get(f"{Path(c).name}|{i.name}|{effort}") for i in images] for c in args.checkpoints]
        if any(r is None for row in rows for r in row):
            continue  # not measured on every image and checkpoint yet
        mean = [{k: sum(r[k] for r in row) / len(row) for k in row[0]} for row in rows]
        curves[effort] = {k: [m[k] for m in mean] for k in ("bpp", "psnr", "ms_ssim")}
        times[effort] = {k: sum(m[k] for m in mean) / len(mean) for k in ("encode_seconds", "decode_seconds")}
    if 0 not in curves:
        raise SystemExit("error: effort 0 is not measured on every image yet: run the measurement first")

    def bd(a: dict, b: dict) -> dict:
        return {"bd_rate_psnr": ev.bd_rate(a["bpp"], a["psnr"], b["bpp"], b["psnr"]),
                "bd_rate_ms_ssim": ev.bd_rate(a["bpp"], ev.msssim_db(a["ms_ssim"]), b["bpp"], ev.msssim_db(b["ms_ssim"]))}  # fmt: skip

    reference = classical(images)
    levels = []
    for effort, curve in curves.items():
        levels.append({"effort": effort, "iterations": bk.EFFORT_ITERATIONS[effort], "against_effort_0": bd(curves[0], curve),
                       "encode_seconds": times[effort]["encode_seconds"],
                       "encode_ratio": times[effort]["encode_seconds"] / times[0]["encode_seconds"],
                       "decode_ratio": times[effort]["decode_seconds"] / times[0]["decode_seconds"],
                       "against": {name: bd(c, curve) for name, c in reference.items()}, "curve": curve})  # fmt: skip
    return {"set": "unseen photographs" if args.unseen else "Kodak images", "images": [i.name for i in images],
            "checkpoints": [Path(c).name for c in args.checkpoints], "threads": args.threads,
            "levels": levels, "classical": reference, "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def write_outputs(summary: dict, out: Path, tag: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"effort{tag}.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Encoder effort ({summary['date']})", "",
             f"{len(summary['checkpoints'])} checkpoints, {summary['set']} {', '.join(summary['images'])}, {summary['threads']} threads, real files.", "",
             "| effort | iterations | BD-rate PSNR vs 0 | BD-rate MS-SSIM vs 0 | encode s / image | x effort 0 | decode x effort 0 | vs JPEG (PSNR) | vs WebP (PSNR) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for lv in summary["levels"]:
        a, vs = lv["against_effort_0"], lv["against"]
        lines.append(f"| {lv['effort']} | {lv['iterations']} | {a['bd_rate_psnr']:+.2f}% | {a['bd_rate_ms_ssim']:+.2f}% | "
                     f"{lv['encode_seconds']:.2f} | {lv['encode_ratio']:.1f}x | {lv['decode_ratio']:.2f}x | "
                     f"{vs['JPEG']['bd_rate_psnr']:+.1f}% | {vs['WebP']['bd_rate_psnr']:+.1f}% |")  # fmt: skip
    (out / f"effort{tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    levels = summary["levels"]
    ax[0].plot([lv["encode_seconds"] for lv in levels], [lv["against_effort_0"]["bd_rate_psnr"] for lv in levels], "o-", label="PSNR")
    ax[0].plot([lv["encode_seconds"] for lv in levels], [lv["against_effort_0"]["bd_rate_ms_ssim"] for lv in levels], "s--", label="MS-SSIM")
    for lv in levels:
        ax[0].annotate(str(lv["effort"]), (lv["encode_seconds"], lv["against_effort_0"]["bd_rate_psnr"]))
    ax[0].set(xscale="log", xlabel="encode seconds per image", ylabel="BD-rate against effort 0 (%)", title="gain against effort")
    ax[0].legend()
    for lv in levels:
        ax[1].plot(lv["curve"]["bpp"], lv["curve"]["psnr"], "o-", label=f"effort {lv['effort']}")
    for name, c in summary["classical"].items():
        ax[1].plot(c["bpp"], c["psnr"], "x:", label=name)
    ax[1].set(xlabel="bpp", ylabel="PSNR (dB)", xlim=(0, 1.1), title="rate-distortion")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"effort{tag}.png", dpi=120)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.unseen:
        import lic_common

        images = lic_common.write_sample_photos(Path(args.work_dir) / "unseen")
    else:
        images = pick_images(args.kodak, args.images)
    cache_path = Path(args.work_dir) / "cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    measure(args, images, cache, cache_path)
    summary = summarize(args, images, cache)
    write_outputs(summary, Path(args.output_dir), args.tag)
    print((Path(args.output_dir) / f"effort{args.tag}.md").read_text())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

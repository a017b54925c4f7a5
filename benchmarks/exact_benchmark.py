"""The exact integer entropy model against the floating-point one it replaces, on the same weights.

For every checkpoint given (the shipped ones by default), on Kodak and on photographs the project
has never seen (scikit-image's), three measurements in one run:

- **rate-distortion**: each image coded with the exact model (a complete file: header, latent
  digest, strings) and with the float entropy model of format 2 (the same weights; its file is
  the old header and the same strings), PSNR and bpp of both, and the BD-rate (PSNR) of the exact
  curve against the float one over the checkpoints;
- **cross-configuration decoding**: each file made in one process configuration (2 threads,
  oneDNN on, contiguous) and decoded in child processes under others (1 thread; all cores with
  oneDNN off; channels_last; the eval script's one image at a time against a batch of images of
  one size): the decoded latent must be the same bit for bit (``decode_image`` refuses a file
  whose latent digest differs; the count of refusals is reported) and the pictures within
  floating-point rounding of the synthesis transform (the lowest PSNR between two decodes);
- **speed**: encode and decode seconds per Kodak image, exact against float, interleaved in one
  process, and their ratio.

    python benchmarks/exact_benchmark.py --kodak ../shared/data/kodak --cache exact_cache.json

Per-image results are cached (``--cache``, JSON), so an interrupted run resumes. Writes
``benchmarks/results/exact.json`` and ``exact.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = sorted((ROOT / "reference_checkpoints").glob("diffusion-hyperprior-lambda*.pth"))
ENCODE_CONFIG = {"threads": 2, "onednn": True, "channels_last": False}
DECODE_CONFIGS = {
    "1 thread": {"threads": 1, "onednn": True, "channels_last": False},
    "all cores, oneDNN off": {"threads": os.cpu_count() or 1, "onednn": False, "channels_last": False},
    "channels_last": {"threads": 2, "onednn": True, "channels_last": True},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=[str(c) for c in SHIPPED], help="exact codec checkpoints (format 3)")
    p.add_argument("--kodak", required=True, help="folder of the Kodak images")
    p.add_argument("--max_images", type=int, default=None, help="first images of each set only (a quick run)")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True, help="also the photographs never seen (scikit-image's)")
    p.add_argument("--cross", action=argparse.BooleanOptionalAction, default=True, help="decode in child processes of other configurations")
    p.add_argument("--cache", default=None, help="JSON file of per-image results, read and extended (resumable)")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"), help="where exact.json and exact.md go")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a child process's job file
    args = p.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        p.error("--max_images must be >= 1")
    return args


# ---- Child processes: one configuration each ----


def worker(job_path: str) -> None:
    """Encode or decode a list of images under the configuration the job names; every decode goes
    through ``decode_image`` (which checks the latent digest) and writes the picture for comparison."""
    import torch

    job = json.loads(Path(job_path).read_text())
    cfg = job["config"]
    torch.set_num_threads(cfg["threads"])
    torch.backends.mkldnn.enabled = cfg["onednn"]
    import bk_sdm_compression as bk
    import lic_common

    model, _ = bk.load_codec(job["checkpoint"])
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model_id = model.fingerprint()
    results = {}
    for item in job["items"]:
        if job["task"] == "encode":
            data = bk.encode_image(model, lic_common.load_image(item["image"]), model_id=model_id)
            Path(item["file"]).write_bytes(data)
            results[item["file"]] = "ok"
        elif job["task"] == "batch":  # the same images as one batch: each image's digest
            x = torch.stack([lic_common.load_image(p) for p in item["images"]])
            results["|".join(item["images"])] = [d.hex() for d in model.compress(x)["digests"]]
        else:
            try:
                x_hat = bk.decode_image(model, Path(item["file"]).read_bytes(), model_id=model_id)
                torch.save(x_hat, item["out"])
                results[item["file"]] = "ok"
            except bk.BitstreamError as e:
                results[item["file"]] = f"refused: {e}"
    Path(job["result"]).write_text(json.dumps(results))


def run_child(task: str, checkpoint: str, config: dict, items: list, scratch: Path) -> dict:
    job, result = scratch / f"{task}-job.json", scratch / f"{task}-result.json"
    job.write_text(json.dumps({"task": task, "checkpoint": checkpoint, "config": config, "items": items, "result": str(result)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "MKL_NUM_THREADS": str(config["threads"])}
    subprocess.run([sys.executable, __file__, "--kodak", ".", "--worker", str(job)], check=True, env=env)
    return json.loads(result.read_text())


def cross_check(checkpoint: str, images: list[Path], scratch: Path) -> dict:
    """Files made under ENCODE_CONFIG, decoded under each of DECODE_CONFIGS and in the encoder's
    own configuration; digests of a batch against those of single images."""
    import torch

    files = [{"image": str(p), "file": str(scratch / f"{p.stem}.bksd")} for p in images]
    run_child("encode", checkpoint, ENCODE_CONFIG, files, scratch)
    decoded, refused = {}, {}
    for name, cfg in {"encoder's": ENCODE_CONFIG, **DECODE_CONFIGS}.items():
        items = [{"file": f["file"], "out": str(scratch / f"{Path(f['file']).stem}.{len(decoded)}.pt")} for f in files]
        res = run_child("decode", checkpoint, cfg, items, scratch)
        refused[name] = sum(v != "ok" for v in res.values())
        decoded[name] = {it["file"]: torch.load(it["out"]) for it in items if res[it["file"]] == "ok"}
    lowest = math.inf
    base = decoded["encoder's"]
    for name, pictures in decoded.items():
        for f, x in pictures.items():
            if f in base:
                mse = (x - base[f]).pow(2).mean().item()
                lowest = min(lowest, math.inf if mse == 0 else 10 * math.log10(1 / mse))
    # batches: images of one size coded together, against each alone (in one process)
    by_size: dict[tuple, list[str]] = {}
    for p in images:
        from PIL import Image

        with Image.open(p) as im:
            by_size.setdefault(im.size, []).append(str(p))
    groups = [g[:4] for g in by_size.values() if len(g) > 1]
    batch_digests = run_child("batch", checkpoint, ENCODE_CONFIG, [{"images": g} for g in groups], scratch) if groups else {}
    single = run_child("batch", checkpoint, ENCODE_CONFIG, [{"images": [p]} for g in groups for p in g], scratch) if groups else {}
    batch_mismatch = sum(d != single[p][0] for key, ds in batch_digests.items() for p, d in zip(key.split("|"), ds))
    return {"images": len(images), "refused": refused, "lowest_psnr_between_decodes": lowest,
            "batched_images": sum(len(g) for g in groups), "batch_digest_mismatches": batch_mismatch}  # fmt: skip


# ---- In-process: rate-distortion and speed, exact against float ----


def float_code(model, x):
    """The float entropy model of format 2 on the same weights: (file bytes, x_hat, encode s, decode s)."""
    import torch

    gc, eb = model.gaussian_conditional, model.entropy_bottleneck
    with torch.no_grad():
        t0 = time.perf_counter()
        y = model.g_a(model._pad(x[None])).float()
        z = model.h_a(y)
        z_strings = eb.compress(z)
        z_hat = eb.decompress(z_strings, z.shape[-2:])
        mu0, sigma0 = model.hyper_decode(z_hat)
        strings = []

        def code(k, selected, means, scales):
            values = y[:, selected]
            strings.append(gc.compress(values, gc.build_indexes(scales), means=means))
            return gc.quantize(values, "dequantize", means)

        model._run_chain(mu0, sigma0, code)
        strings.append(z_strings)
        t1 = time.perf_counter()
        z_hat = eb.decompress(strings[-1], model.z_shape(*x.shape[-2:]))
        mu0, sigma0 = model.hyper_decode(z_hat)

        def decode(k, selected, means, scales):
            return gc.decompress(strings[k], gc.build_indexes(scales), mu0.dtype, means=means)

        y_hat = model._run_chain(mu0, sigma0, decode)[0]
        x_hat = model.g_s(y_hat)[0, :, : x.shape[-2], : x.shape[-1]].clamp(0, 1)
        t2 = time.perf_counter()
    size = 25 + sum(4 + len(s[0]) for s in strings) + 4  # format 2: header, length-prefixed strings, CRC
    return size, x_hat, t1 - t0, t2 - t1


def exact_code(model, x, model_id):
    import bk_sdm_compression as bk

    t0 = time.perf_counter()
    data = bk.encode_image(model, x, model_id=model_id)
    t1 = time.perf_counter()
    x_hat = bk.decode_image(model, data, model_id=model_id)
    return len(data), x_hat, t1 - t0, time.perf_counter() - t1


def measure(checkpoint: str, sets: dict[str, list[Path]], cache: dict, save) -> dict:
    import bk_sdm_compression as bk
    import lic_common

    model, _ = bk.load_codec(checkpoint)
    model_id = model.fingerprint()
    warm = lic_common.load_image(next(iter(sets.values()))[0])
    exact_code(model, warm, model_id), float_code(model, warm)  # first calls build caches
    for set_name, images in sets.items():
        for p in images:
            key = f"{Path(checkpoint).name}|{set_name}|{p.name}"
            if key in cache:
                continue
            x = lic_common.load_image(p)
            pixels = x.shape[-1] * x.shape[-2]
            row = {}
            for name, fn in (("float", lambda: float_code(model, x)), ("exact", lambda: exact_code(model, x, model_id))):
                size, x_hat, enc, dec = fn()
                row[name] = {"bpp": 8 * size / pixels, "psnr": lic_common.psnr(x, x_hat), "encode_s": enc, "decode_s": dec}
            cache[key] = row
            save()
    return cache


# ---- Report ----


def curves(cache: dict, checkpoints: list[str], set_name: str) -> dict:
    out = {}
    for kind in ("float", "exact"):
        bpp, psnr = [], []
        for ck in checkpoints:
            rows = [v[kind] for k, v in cache.items() if k.startswith(f"{Path(ck).name}|{set_name}|")]
            if rows:
                bpp.append(statistics.mean(r["bpp"] for r in rows))
                psnr.append(statistics.mean(r["psnr"] for r in rows))
        out[kind] = {"bpp": bpp, "psnr-rgb": psnr}
    return out


def report(args, cache, cross, sets) -> dict:
    import evaluate_bk_sdm_compression as ev

    result = {"checkpoints": [Path(c).name for c in args.checkpoints], "sets": {k: [p.name for p in v] for k, v in sets.items()},
              "curves": {}, "bd_rate_psnr_exact_vs_float": {}, "speed": {}, "cross_configuration": cross,
              "encode_config": ENCODE_CONFIG, "decode_configs": DECODE_CONFIGS}  # fmt: skip
    for set_name in sets:
        c = curves(cache, args.checkpoints, set_name)
        result["curves"][set_name] = c
        if len(c["float"]["bpp"]) >= 4:
            result["bd_rate_psnr_exact_vs_float"][set_name] = ev.bd_rate(c["float"]["bpp"], c["float"]["psnr-rgb"],
                                                                         c["exact"]["bpp"], c["exact"]["psnr-rgb"])  # fmt: skip
    kodak = [v for k, v in cache.items() if "|kodak|" in k and k.split("|")[0] in result["checkpoints"]]
    for what in ("encode_s", "decode_s"):
        f = statistics.mean(r["float"][what] for r in kodak)
        e = statistics.mean(r["exact"][what] for r in kodak)
        result["speed"][what] = {"float": f, "exact": e, "ratio": e / f}
    return result


def markdown(result: dict) -> str:
    lines = ["Exact integer entropy model against the float one, same weights (real files).", ""]
    for set_name, c in result["curves"].items():
        lines += [f"{set_name} ({len(result['sets'][set_name])} images):", "", "| checkpoint | float bpp | float PSNR | exact bpp | exact PSNR |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for i, name in enumerate(result["checkpoints"]):
            f, e = c["float"], c["exact"]
            lines.append(f"| {name} | {f['bpp'][i]:.4f} | {f['psnr-rgb'][i]:.3f} | {e['bpp'][i]:.4f} | {e['psnr-rgb'][i]:.3f} |")
        if set_name in result["bd_rate_psnr_exact_vs_float"]:
            lines.append(f"\nBD-rate (PSNR) of exact against float: {result['bd_rate_psnr_exact_vs_float'][set_name]:+.3f}%")
        lines.append("")
    s = result["speed"]
    lines.append(f"Kodak, seconds per image: encode {s['encode_s']['float']:.3f} float / {s['encode_s']['exact']:.3f} exact "
                 f"(x{s['encode_s']['ratio']:.2f}), decode {s['decode_s']['float']:.3f} / {s['decode_s']['exact']:.3f} "
                 f"(x{s['decode_s']['ratio']:.2f})")  # fmt: skip
    if result["cross_configuration"]:
        lines += ["", "Cross-configuration decoding (encoded with 2 threads, oneDNN on, contiguous):", "",
                  "| checkpoint | set | images | refused per decoder configuration | lowest PSNR between decodes | batch digest mismatches |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for key, c in result["cross_configuration"].items():
            ck, set_name = key.split("|")
            refused = ", ".join(f"{k}: {v}" for k, v in c["refused"].items())
            lines.append(f"| {ck} | {set_name} | {c['images']} | {refused} | {c['lowest_psnr_between_decodes']:.1f} dB | "
                         f"{c['batch_digest_mismatches']} of {c['batched_images']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    import lic_common

    kodak = lic_common.list_images(args.kodak)[: args.max_images]
    if not kodak:
        raise SystemExit(f"error: no images in {args.kodak}")
    scratch_root = Path(tempfile.mkdtemp(prefix="exact_benchmark_"))
    sets = {"kodak": kodak}
    if args.unseen:
        sets["unseen"] = lic_common.write_sample_photos(scratch_root / "unseen")[: args.max_images]
    cache_path = Path(args.cache) if args.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}

    def save():
        if cache_path:
            lic_common.write_text_atomic(cache_path, json.dumps(cache, indent=1))

    for ck in args.checkpoints:
        measure(ck, sets, cache, save)
        print(f"{Path(ck).name}: measured", flush=True)
    cross = cache.setdefault("__cross__", {})
    if args.cross:
        for ck in args.checkpoints:
            for set_name, images in sets.items():
                key = f"{Path(ck).name}|{set_name}"
                if key not in cross:
                    scratch = scratch_root / key.replace("|", "_")
                    scratch.mkdir(parents=True)
                    cross[key] = cross_check(ck, images, scratch)
                    save()
                print(f"{key}: {cross[key]}", flush=True)
    rows = {k: v for k, v in cache.items() if k != "__cross__"}
    result = report(args, rows, {k: cross[k] for k in cross if k.split("|")[0] in [Path(c).name for c in args.checkpoints]}, sets)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lic_common.write_text_atomic(out / "exact.json", json.dumps(result, indent=1))
    lic_common.write_text_atomic(out / "exact.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Photographs of any size, many at once: what the command line costs in memory and time.

Three measurements of ``bk_sdm_compression.py`` as a user runs it (at ``--effort 0``: the
analysis transforms' latent, whose cost the latent search adds to), one command:

- **sizes** (``--stage sizes``): a photograph resized (bicubic) to each of ``--megapixels`` (4:3)
  is compressed and the file decompressed, each call in its own process with ``--threads``
  threads, ``--repeats`` times (the fastest kept): wall seconds, the codec's own seconds (what the
  command prints: encode or decode, without start-up and image I/O) and the process's peak
  resident memory (``wait4``; the largest of the repeats), and the
  codec's seconds per megapixel against the smallest size's; the smallest is also coded without
  tiles (``--tile 0``), to check that tiling changes no byte;
- **batch** (``--stage batch``): the first ``--batch_images`` Kodak images compressed in one call
  (``--output_dir``) against one call per image: wall seconds of each way, and whether the files
  are the same bytes;
- **startup** (``--stage startup``): ``--help`` of the five scripts (seconds each), and the fixed
  cost of a call (the wall time of a one-image call less its encode seconds) against the cost of
  each further image in a batch.

    python benchmarks/large_image_benchmark.py --kodak ../shared/data/kodak

Writes ``large_images.json``, ``large_images.md`` and ``large_images.png`` to ``--output_dir``;
the resized photographs and the files stay in ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("bk_sdm_compression.py", "train_bk_sdm_compression.py", "evaluate_bk_sdm_compression.py",
           "finetune_after_distill.py", "token_compress.py")  # fmt: skip
CHECKPOINT = ROOT / "reference_checkpoints" / "diffusion-hyperprior-lambda0.0023.pth"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=("all", "sizes", "batch", "startup"), default="all", help="which measurement to run")
    p.add_argument("--checkpoint", default=str(CHECKPOINT), help="codec checkpoint")
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="Kodak images (the batch, and the photograph resized)")
    p.add_argument("--source", default="kodim23.png", help="the Kodak image resized to each size")
    p.add_argument("--megapixels", type=float, nargs="+", default=[3, 12, 24, 48], help="picture sizes (4:3)")
    p.add_argument("--batch_images", type=int, default=24, help="Kodak images of the batch measurement")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every call")
    p.add_argument("--repeats", type=int, default=2, help="calls per size and direction; the fastest is kept (a shared machine's speed varies)")
    p.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs" / "large_images"), help="resized photographs and files")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON, Markdown and plot go")
    args = p.parse_args(argv)
    if min(args.megapixels) <= 0 or args.batch_images < 2 or args.threads < 1 or args.repeats < 1:
        p.error("--megapixels must be > 0, --batch_images >= 2, --threads and --repeats >= 1")
    return args


def call(argv: list[str], threads: int) -> dict:
    """One process: wall seconds, peak resident memory (GiB, from ``wait4``), minor page faults
    (pages the kernel had to map and zero: fresh memory), its output; fails loudly."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {"wall_s": seconds, "peak_gib": usage.ru_maxrss / 2**20, "page_faults": usage.ru_minflt, "stdout": stdout, "stderr": stderr}


def codec_seconds(output: str) -> float:
    """The seconds the command prints at the end of its line for one file."""
    return float(re.findall(r"([0-9.]+) s$", output.strip(), re.M)[-1])


# ---- Sizes ----


def picture(args, megapixels: float) -> Path:
    from PIL import Image

    width = round((megapixels * 1e6 * 4 / 3) ** 0.5 / 16) * 16
    height = round(width * 3 / 4 / 16) * 16
    path = Path(args.work_dir) / f"{megapixels:g}MP.png"
    if not path.is_file():
        with Image.open(Path(args.kodak) / args.source) as img:
            img.convert("RGB").resize((width, height), Image.BICUBIC).save(path, compress_level=1)
    return path


def measure_sizes(args) -> list[dict]:
    from PIL import Image

    sizes = sorted(args.megapixels)
    files = {mp: (src, src.with_suffix(".bksd"), src.with_name(src.stem + "-decoded.png")) for mp in sizes for src in [picture(args, mp)]}
    runs = {}  # (megapixels, kind) -> every call's measurement
    for repeat in range(args.repeats):  # the sizes in turn, repeat after repeat: a slow spell of the machine hits every size
        for mp in sizes:
            src, data, back = files[mp]
            for kind, argv in (("compress", ["compress", str(src), str(data), "--effort", "0"]), ("decompress", ["decompress", str(data), str(back)])):
                r = call(["bk_sdm_compression.py", *argv, "--checkpoint", args.checkpoint], args.threads)
                runs.setdefault((mp, kind), []).append(r | {"codec_s": codec_seconds(r["stdout"])})
                print(f"{mp:g} MP {kind} ({repeat + 1}/{args.repeats}): {r['wall_s']:.1f} s wall, {runs[mp, kind][-1]['codec_s']:.1f} s codec, "
                      f"peak {r['peak_gib']:.2f} GiB, {r['page_faults'] / 1e6:.2f} M page faults", flush=True)  # fmt: skip
    rows = []
    for mp in sizes:
        src, data, back = files[mp]
        row = {"megapixels": mp}
        for kind in ("compress", "decompress"):
            fastest = min(runs[mp, kind], key=lambda r: r["codec_s"])
            row[kind] = {"wall_s": fastest["wall_s"], "codec_s": fastest["codec_s"], "codec_s_all": [r["codec_s"] for r in runs[mp, kind]],
                         "peak_gib": max(r["peak_gib"] for r in runs[mp, kind]), "page_faults": fastest["page_faults"]}  # fmt: skip
        with Image.open(src) as a, Image.open(back) as b:
            row["pixels"] = a.width * a.height
            assert a.size == b.size
        row["bpp"] = 8 * data.stat().st_size / row["pixels"]
        if mp == sizes[0]:  # tiles change no byte: the smallest picture coded whole as well
            whole = src.with_name(src.stem + "-whole.bksd")
            call(["bk_sdm_compression.py", "compress", str(src), str(whole), "--checkpoint", args.checkpoint, "--tile", "0", "--effort", "0"], args.threads)
            row["whole_is_the_same_file"] = whole.read_bytes() == data.read_bytes()
        rows.append(row)
    base = rows[0]
    for row in rows:
        for kind in ("compress", "decompress"):
            row[kind]["per_pixel_vs_smallest"] = (row[kind]["codec_s"] / row["pixels"]) / (base[kind]["codec_s"] / base["pixels"])
    return rows


# ---- Batch and start-up ----


def measure_batch(args) -> dict:
    files = sorted(Path(args.kodak).glob("*.png"))[: args.batch_images]
    work = Path(args.work_dir)
    single = 0.0
    for f in files:
        single += call(["bk_sdm_compression.py", "compress", str(f), str(work / "single" / f"{f.stem}.bksd"), "--checkpoint", args.checkpoint, "--effort", "0"],
                       args.threads)["wall_s"]  # fmt: skip
    batch = call(["bk_sdm_compression.py", "compress", *map(str, files), "--output_dir", str(work / "batch"), "--checkpoint", args.checkpoint, "--effort", "0",
                  "--no-progress"], args.threads)  # fmt: skip
    same = all((work / "batch" / f"{f.stem}.bksd").read_bytes() == (work / "single" / f"{f.stem}.bksd").read_bytes() for f in files)
    encode = sum(codec_seconds(line) for line in batch["stdout"].strip().splitlines())
    result = {"images": len(files), "one_call_per_image_s": single, "one_call_s": batch["wall_s"], "ratio": batch["wall_s"] / single,
              "identical_files": same, "encode_s": encode}  # fmt: skip
    print(f"{len(files)} images: one call {batch['wall_s']:.1f} s, one call each {single:.1f} s ({result['ratio']:.2f}x), "
          f"files identical: {same}", flush=True)  # fmt: skip
    return result


def measure_startup(args, batch: dict | None) -> dict:
    helps = {}
    for script in SCRIPTS:
        helps[script] = min(call([script, "--help"], args.threads)["wall_s"] for _ in range(2))
        print(f"{script} --help: {helps[script]:.2f} s", flush=True)
    f = sorted(Path(args.kodak).glob("*.png"))[0]
    one = call(["bk_sdm_compression.py", "compress", str(f), str(Path(args.work_dir) / "one.bksd"), "--checkpoint", args.checkpoint, "--effort", "0"], args.threads)
    result = {"help_s": helps, "call_s": one["wall_s"], "fixed_s": one["wall_s"] - codec_seconds(one["stdout"])}
    if batch:
        result["per_further_image_s"] = (batch["one_call_s"] - one["wall_s"]) / (batch["images"] - 1)
    return result


# ---- Report ----


def markdown(result: dict) -> str:
    lines = ["# Photographs of any size, many at once", "", f"`bk_sdm_compression.py` with {Path(result['checkpoint']).name}, "
             f"{result['threads']} CPU threads, each call its own process.", ""]  # fmt: skip
    if result.get("sizes"):
        lines += ["| picture | bpp | compress s (codec) | peak GiB | s/MP vs smallest | decompress s (codec) | peak GiB | s/MP vs smallest | "
                  "page faults (M), compress / decompress |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in result["sizes"]:
            c, d = r["compress"], r["decompress"]
            lines.append(f"| {r['pixels'] / 1e6:.1f} MP | {r['bpp']:.4f} | {c['wall_s']:.1f} ({c['codec_s']:.1f}) | {c['peak_gib']:.2f} | "
                         f"{c['per_pixel_vs_smallest']:.2f}x | {d['wall_s']:.1f} ({d['codec_s']:.1f}) | {d['peak_gib']:.2f} | "
                         f"{d['per_pixel_vs_smallest']:.2f}x | {c.get('page_faults', math.nan) / 1e6:.2f} / {d.get('page_faults', math.nan) / 1e6:.2f} |")  # fmt: skip
        same = [r["whole_is_the_same_file"] for r in result["sizes"] if "whole_is_the_same_file" in r]
        if same:
            lines.append("")
            lines.append(f"The smallest picture coded whole (`--tile 0`) is {'the same file' if same[0] else 'ANOTHER file'}.")
        lines.append("")
    b = result.get("batch")
    if b:
        lines += [f"{b['images']} Kodak images: one call {b['one_call_s']:.1f} s, one call per image {b['one_call_per_image_s']:.1f} s "
                  f"(**{b['ratio']:.2f}x**); the files are {'identical' if b['identical_files'] else 'NOT identical'}.", ""]  # fmt: skip
    s = result.get("startup")
    if s:
        lines += ["| script | `--help` s |", "| --- | --- |"] + [f"| {k} | {v:.2f} |" for k, v in s["help_s"].items()] + [""]
        lines.append(f"A one-image call: {s['call_s']:.1f} s, of which {s['fixed_s']:.1f} s fixed (start-up, model, image I/O)"
                     + (f"; each further image in a batch {s['per_further_image_s']:.2f} s." if "per_further_image_s" in s else "."))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    mp = [r["pixels"] / 1e6 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("compress", "o"), ("decompress", "s")):
        a.plot(mp, [r[kind]["peak_gib"] for r in rows], marker=marker, label=kind)
        b.plot(mp, [r[kind]["codec_s"] for r in rows], marker=marker, label=kind)
    a.set(xlabel="megapixels", ylabel="peak resident memory (GiB)", title="memory", ylim=(0, None))
    b.set(xlabel="megapixels", ylabel="seconds (codec)", title=f"time, {result['threads']} CPU threads", ylim=(0, None))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "large_images.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result |= {"checkpoint": str(Path(args.checkpoint).name), "threads": args.threads}
    if args.stage in ("all", "sizes"):
        result["sizes"] = measure_sizes(args)
    if args.stage in ("all", "batch"):
        result["batch"] = measure_batch(args)
    if args.stage in ("all", "startup"):
        result["startup"] = measure_startup(args, result.get("batch"))
    path.write_text(json.dumps(result, indent=1))
    (out / "large_images.md").write_text(markdown(result))
    if result.get("sizes"):
        plot(result, out / "large_images.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Speed benchmark: the codec with and without its diffusion steps against CompressAI's hyperprior.

Interleaved in one run, on the same images and device:
- encode and decode time per Kodak image (real bitstreams: our complete file; CompressAI's
  strings), and the peak memory that one encode + decode of the first image adds, each model in
  a fresh child process (CPU: peak resident set size above the loaded model, Linux; CUDA: peak
  allocated);
- the U-Net's cost per reverse step at Kodak's latent size;
- training throughput (images / s) of each model under the same loop (forward, rate-distortion
  loss, backward, both optimizers; bfloat16 autocast with ``--amp``) on random crops, the codec
  trained without diffusion (``--diffusion_steps 0``) among them.
Ratios are against ``bmshj2018-hyperprior`` of the same N / M, and the codec's training step
against its own without diffusion; the codec's coding times also against the same weights coded
with the floating-point entropy model that the exact integer one replaced (format 2, measured
interleaved: the cost of exactness). Models are the benchmark's trained
checkpoints when given (``--checkpoint``, ``--hyperprior_checkpoint``), else freshly initialised
ones (entropy coding time depends on the rate, so trained checkpoints give the honest figures).

    python benchmarks/speed_benchmark.py --kodak ../shared/data/kodak \
        --checkpoint benchmarks/runs/diffusion-hyperprior/lambda0.0012/best_checkpoint.pth \
        --hyperprior_checkpoint benchmarks/runs/bmshj2018-hyperprior/lambda0.0012/best_checkpoint.pth
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bk_sdm_compression as bk  # noqa: E402
import evaluate_bk_sdm_compression as ev  # noqa: E402
import exact_benchmark  # noqa: E402
import lic_common  # noqa: E402
import train_bk_sdm_compression as tr  # noqa: E402

BASELINES = ("bmshj2018-hyperprior", "mbt2018-mean")  # CompressAI models of the same N / M


def build_models(args) -> dict[str, torch.nn.Module]:
    """The three models: ours with its reverse steps, the same weights with 0 steps, CompressAI's."""
    if args.checkpoint:
        ours = bk.load_codec(args.checkpoint)[0]
        ours_0 = bk.load_codec(args.checkpoint, diffusion_steps=0)[0]
    else:
        torch.manual_seed(0)
        ours = bk.create_diffusion_hyperprior_model(args.N, args.M, args.diffusion_steps, unet_channels=args.unet_channels)
        ours_0 = bk.create_diffusion_hyperprior_model(args.N, args.M, args.diffusion_steps, unet_channels=args.unet_channels)
        ours_0.load_state_dict(ours.state_dict())
        ours_0.set_inference_steps(0)
        for m in (ours, ours_0):
            m.update(force=True)
    if args.hyperprior_checkpoint:
        hp = ev.load_learned(args.hyperprior_checkpoint, argparse.Namespace(bk_sdm_path=None, diffusion_steps=None))
    else:
        from compressai.models import MeanScaleHyperprior, ScaleHyperprior

        N, M = (ours.config.N, ours.config.M) if args.checkpoint else (args.N, args.M)
        hp = (ScaleHyperprior if args.baseline == "bmshj2018-hyperprior" else MeanScaleHyperprior)(N, M)
        hp.update(force=True)
    return {f"ours ({ours.inference_steps} steps)": ours.eval(), "ours (0 steps)": ours_0.eval(), args.baseline: hp.eval()}


class FloatEntropyCodec:
    """The codec's weights coded with the float entropy model of format 2 (``exact_benchmark.float_code``)."""

    def __init__(self, model, device):
        self.model = model.to(device).eval()

    def code(self, x):
        size, x_hat, t_enc, t_dec = exact_benchmark.float_code(self.model, x.to(next(self.model.parameters()).device))
        return bytes(size), x_hat.cpu(), t_enc, t_dec


FLOAT_ENTROPY = "ours, float entropy model"


def coding_times(models: dict, images: list[torch.Tensor], repeats: int, device) -> dict:
    """Median encode / decode seconds per image, models interleaved image by image."""
    codecs = {name: ev.LearnedCodec(name, "", m, device) for name, m in models.items()}
    codecs[FLOAT_ENTROPY] = FloatEntropyCodec(next(iter(models.values())), device)
    times = {name: {"encode": [], "decode": [], "bytes": []} for name in codecs}
    for _ in range(repeats):
        for x in images:
            for name, codec in codecs.items():
                data, _, t_enc, t_dec = codec.code(x)
                times[name]["encode"].append(t_enc)
                times[name]["decode"].append(t_dec)
                times[name]["bytes"].append(len(data))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def _rss_kb() -> tuple[int, int]:
    """(current, peak) resident set size of this process in kB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _memory_child(args, name, x, queue):
    """Peak memory that one encode + decode adds to a process holding the model (Linux)."""
    torch.set_num_threads(args.threads)
    codec = ev.LearnedCodec(name, "", build_models(args)[name], torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before, _ = _rss_kb()
    codec.code(x)
    queue.put((_rss_kb()[1] - before) / 1024)


def peak_memory_mb(args, names, x, device) -> dict:
    """Peak memory added by one encode + decode of ``x``, each model in its own process (CPU)."""
    if device.type == "cuda":
        out = {}
        models = build_models(args)
        for name in names:
            torch.cuda.reset_peak_memory_stats(device)
            ev.LearnedCodec(name, "", models[name], device).code(x)
            out[name] = torch.cuda.max_memory_allocated(device) / 2**20
        return out
    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(args, name, x, q))
        p.start()
        out[name] = q.get(timeout=600)
        p.join()
    return out


def unet_step_seconds(model: bk.DiffusionHyperprior, x: torch.Tensor, repeats: int) -> float | None:
    """Seconds of one U-Net pass (one reverse step) at the latent size of image ``x``."""
    if model.unet is None:
        return None
    with torch.no_grad():
        y = model.g_a(model._pad(x[None]))
        known, step = torch.zeros_like(y, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
        scale = y.abs() + 1
        model._predict(y, known, step, y, scale)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model._predict(y, known, step, y, scale)
    return (time.perf_counter() - start) / repeats


def training_throughput(args, models: dict, steps: int) -> dict:
    """Images per second of forward + loss + backward + both optimizer steps, interleaved."""
    trained = {}
    for name, m in models.items():
        if name == "ours (0 steps)" and args.checkpoint is None:
            m = bk.create_diffusion_hyperprior_model(args.N, args.M, 0)  # trained without diffusion
        trained[name] = m if isinstance(m, bk.DiffusionHyperprior) else tr.entropy_models_in_fp32(m)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    times = tr.time_training_steps(trained, tr.RateDistortionLoss(1e-3), x, args.train_steps + 2, amp=args.amp)
    return {name: args.batch_size / statistics.median(t[2:]) for name, t in times.items()}  # two warm-up steps


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kodak", default=str(ROOT.parent / "shared" / "data" / "kodak"), help="images to code")
    p.add_argument("--checkpoint", default=None, help="trained diffusion-hyperprior checkpoint (else a fresh model)")
    p.add_argument("--baseline", default=BASELINES[0], choices=BASELINES, help="the CompressAI model the ratios are against")
    p.add_argument("--hyperprior_checkpoint", default=None, help="trained checkpoint of --baseline (else a fresh one of the codec's N / M)")
    p.add_argument("--N", type=int, default=64, help="channels of fresh models")
    p.add_argument("--M", type=int, default=96, help="latent channels of fresh models")
    p.add_argument("--diffusion_steps", type=int, default=4, help="reverse steps of a fresh model")
    p.add_argument("--unet_channels", type=int, default=32, help="U-Net width of a fresh model")
    p.add_argument("--max_images", type=int, default=6, help="Kodak images coded (0: all 24)")
    p.add_argument("--repeats", type=int, default=2, help="passes over the images (medians are reported)")
    p.add_argument("--train_steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--batch_size", type=int, default=16, help="training batch")
    p.add_argument("--image_size", type=int, default=64, help="training crop")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="train under bfloat16 autocast (as the RD benchmark does)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "speed.json"), help="JSON with every figure")
    return p.parse_args(argv)


def main(argv) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = build_models(args)
    images = [lic_common.load_image(p) for p in lic_common.list_images(args.kodak)[: args.max_images or None]]
    coding = coding_times(models, images, args.repeats, device)
    memory = peak_memory_mb(args, list(models), images[0], device)
    ours = next(iter(models.values()))
    unet = unet_step_seconds(ours.cpu(), images[0], 5) if device.type == "cpu" else None
    throughput = training_throughput(args, {k: v.cpu() for k, v in build_models(args).items()}, args.train_steps) if device.type == "cpu" else {}
    ref = coding[args.baseline]
    result = {
        "device": str(device), "threads": args.threads, "images": len(images), "checkpoints": [args.checkpoint, args.hyperprior_checkpoint],
        "coding": coding, "peak_memory_mb": memory, "unet_seconds_per_step": unet, "training_images_per_second": throughput,
        "ratios_vs_" + args.baseline: {name: {"encode": c["encode"] / ref["encode"], "decode": c["decode"] / ref["decode"],
                                          "training": (throughput[args.baseline] / throughput[name]) if name in throughput else None}
                                   for name, c in coding.items()},
    }  # fmt: skip
    ours_name = next(iter(models))
    result["exact_vs_float_entropy_model"] = {k: coding[ours_name][k] / coding[FLOAT_ENTROPY][k] for k in ("encode", "decode")}
    if throughput:
        result["training_step_vs_no_diffusion"] = throughput["ours (0 steps)"] / throughput[ours_name]
    print(f"{'model':<22}{'encode s':>10}{'decode s':>10}{'enc ratio':>11}{'dec ratio':>11}{'peak MB':>9}{'train img/s':>13}")
    for name, c in coding.items():
        r = result["ratios_vs_" + args.baseline][name]
        print(f"{name:<22}{c['encode']:>10.3f}{c['decode']:>10.3f}{r['encode']:>11.2f}{r['decode']:>11.2f}"
              f"{memory.get(name, float('nan')):>9.0f}{throughput.get(name, float('nan')):>13.1f}")  # fmt: skip
    e = result["exact_vs_float_entropy_model"]
    print(f"exact entropy model: encode {e['encode']:.2f}x, decode {e['decode']:.2f}x the float one (same weights)")
    if unet:
        print(f"U-Net: {unet * 1000:.1f} ms per reverse step at the latent size of a {images[0].shape[-1]}x{images[0].shape[-2]} image")
    if throughput:
        print(f"training step: {result['training_step_vs_no_diffusion']:.2f}x the codec's without diffusion")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

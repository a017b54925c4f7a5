"""The benchmark scripts run end to end at tiny sizes, cache their work and report what they say."""

import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bk_sdm_compression as bk
import lic_common
from conftest import ROOT, write_image
from test_codec import perturbed, save_ckpt, tiny_model

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_rd_benchmark_trains_caches_and_reports(image_dir, tmp_path, monkeypatch):
    import rd_benchmark

    kodak = tmp_path / "kodak"
    for i in range(2):
        write_image(kodak / f"kodim0{i}.png", (64, 96), seed=10 + i)
    argv = ["--train_data", str(image_dir), "--kodak", str(kodak), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--budget_minutes", "0.003", "--timing_steps", "2", "--lambdas", "1e-2", "1e-3",
            "--N", "8", "--M", "8", "--unet_channels", "8", "--batch_size", "2", "--epoch_size", "4", "--image_size", "64",
            "--warmup_steps", "1", "--threads", "1", "--device", "cpu"]  # fmt: skip
    summary = rd_benchmark.main(argv)
    learned = {"diffusion-hyperprior", "diffusion-hyperprior@0steps", "no-diffusion", "bmshj2018-hyperprior",
               "mbt2018-mean", "mbt2018"}  # fmt: skip
    assert set(summary["curves"]) == learned | {"jpeg", "webp", "avif"}
    assert len(summary["curves"]["diffusion-hyperprior"]["results"]["bpp"]) == 2
    assert {"jpeg", "webp", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018", "no-diffusion"} <= set(summary["bd_rate"])
    assert (tmp_path / "results" / "rd_plot.png").is_file() and (tmp_path / "results" / "val_curves.png").is_file()
    val = summary["validation"]
    assert val["lambda"] == 1e-3 and set(val["curves"]) == {c for c in learned if "@" not in c}
    assert all(len(c["step"]) >= 1 and c["step"] == sorted(c["step"]) for c in val["curves"].values())
    table = (tmp_path / "results" / "rd_kodak.md").read_text()
    bits = summary["bits"]
    assert set(bits) == learned - {"mbt2018"}  # its y is coded by a coder of its own, which the meter does not see
    assert all(b["real_over_table"] > 0 for b in bits.values())
    rows = [r for r in csv.DictReader(open(tmp_path / "results" / "per_image.csv")) if r["curve"] in bits]
    # each file holds the table-ideal bits plus its header (43 bytes with the latent digest, the
    # quality, the hyper-latent digest and the CRC) and, for each of its strings (5 with 4 reverse
    # steps: 4 groups and z), a 4-byte length and the coder's flush
    assert rows and all(0 < (float(r["bpp"]) - float(r["bpp_table"])) * 64 * 96 <= 8 * (43 + 5 * 12) for r in rows)
    assert "| no-diffusion | lambda0.001 |" in table and "| diffusion-hyperprior | " in table and "vs bmshj2018-hyperprior" in table
    done = json.loads((tmp_path / "runs" / "no-diffusion" / "lambda0.001" / "done.json").read_text())
    budgets = json.loads((tmp_path / "results" / "step_budgets.json").read_text())
    assert set(budgets["steps"]) == {c for c in learned if "@" not in c}
    assert budgets["steps"]["diffusion-hyperprior"] == max(1, int(0.18 / budgets["seconds_per_step"]["diffusion-hyperprior"]))
    assert "--diffusion_steps 0" in done["command"] and done["step"] == budgets["steps"]["no-diffusion"] >= 1
    assert "--device cpu" in done["command"] and budgets["setup"]["device"] == "cpu"  # budgets are per device
    assert "--no-compile" in done["command"] and budgets["setup"]["compile"] is False  # and per compilation
    assert "--compile" in rd_benchmark.curve_flags("diffusion-hyperprior", rd_benchmark.parse_args(argv + ["--compile"]))
    # the slim files it measures stay with its runs (RUNS_DIR/slim): the shipped reference_checkpoints/ are not its to replace
    slim = tmp_path / "runs" / "slim"
    shipped = sorted(p.name for p in slim.iterdir())
    assert shipped == ["diffusion-hyperprior-lambda0.001.pth", "diffusion-hyperprior-lambda0.01.pth"]
    import bk_sdm_compression as bk

    assert set(torch.load(slim / shipped[0], weights_only=True)) == {"architecture", "codec_format", "config", "state_dict", "exact", "calibration"}
    bk.load_codec(slim / shipped[0])
    # a second call trains nothing and re-measures nothing: everything comes from the caches
    stamp = (tmp_path / "runs" / "no-diffusion" / "lambda0.001" / "best_checkpoint.pth").stat().st_mtime_ns
    cache = (tmp_path / "results" / "eval_cache.json").stat().st_mtime_ns
    assert json.dumps(rd_benchmark.main(argv)["curves"]) == json.dumps(summary["curves"])  # NaN-safe
    assert (tmp_path / "runs" / "no-diffusion" / "lambda0.001" / "best_checkpoint.pth").stat().st_mtime_ns == stamp
    assert (tmp_path / "results" / "eval_cache.json").stat().st_mtime_ns == cache
    # budgets timed for other sizes are not reused
    rd_benchmark.step_budgets(rd_benchmark.parse_args(argv + ["--batch_size", "3"]))
    assert json.loads((tmp_path / "results" / "step_budgets.json").read_text())["setup"]["batch_size"] == 3
    # nor budgets timed uncompiled for compiled runs: --compile times every curve's model compiled (a stand-in compile here)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    rd_benchmark.step_budgets(rd_benchmark.parse_args(argv + ["--batch_size", "3", "--compile"]))
    assert len(compiled) == len(rd_benchmark.CURVES) and json.loads((tmp_path / "results" / "step_budgets.json").read_text())["setup"]["compile"]


def test_step_budgets_are_timed_once_by_copies_started_together(tmp_path, monkeypatch):
    import threading

    import rd_benchmark

    timings = []

    def fake_timing(models, criterion, x, steps, **kw):  # slow enough for the copies to overlap
        timings.append(threading.get_ident())
        time.sleep(0.3)
        return {name: [1.0, 0.5] for name in models}

    monkeypatch.setattr(rd_benchmark.tr, "time_training_steps", fake_timing)
    monkeypatch.setattr(rd_benchmark.tr, "build_model", lambda config: torch.nn.Linear(1, 1))  # nothing else is needed
    monkeypatch.setattr(rd_benchmark.tr, "set_training_options", lambda model, args: model)
    args = rd_benchmark.parse_args(["--results_dir", str(tmp_path), "--budget_minutes", "1", "--device", "cpu"])
    budgets = []
    copies = [threading.Thread(target=lambda: budgets.append(rd_benchmark.step_budgets(args))) for _ in range(3)]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join()
    assert len(timings) == 1  # the others waited for the first and read its budgets
    assert budgets == [{curve: 120 for curve in rd_benchmark.CURVES}] * 3


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_speed_benchmark_reports_ratios(tmp_path):
    import speed_benchmark

    kodak = tmp_path / "kodak"
    write_image(kodak / "a.png", (64, 64))
    result = speed_benchmark.main(["--kodak", str(kodak), "--N", "8", "--M", "8", "--unet_channels", "8", "--repeats", "1",
                                   "--train_steps", "1", "--batch_size", "2", "--threads", "1", "--output", str(tmp_path / "s.json")])  # fmt: skip
    ratios = result["ratios_vs_bmshj2018-hyperprior"]
    assert ratios["bmshj2018-hyperprior"]["encode"] == 1.0 and set(ratios) == set(result["peak_memory_mb"]) | {speed_benchmark.FLOAT_ENTROPY}
    assert all(v > 0 for v in result["exact_vs_float_entropy_model"].values())
    assert result["unet_seconds_per_step"] > 0 and all(v > 0 for v in result["training_images_per_second"].values())
    assert json.loads((tmp_path / "s.json").read_text())["coding"] == result["coding"]


def test_rd_benchmark_runs_claimed_by_a_live_process_are_left_to_it(tmp_path):
    """Several copies of the benchmark share the runs: one claimed by a live process is skipped,
    a claim left by a dead process is taken over, and a finished claim is removed."""
    import socket

    import rd_benchmark

    args = rd_benchmark.parse_args(["--runs_dir", str(tmp_path), "--results_dir", str(tmp_path / "results")])
    out = rd_benchmark.run_dir(args, "no-diffusion", 1e-3)
    out.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "claim.json").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        assert rd_benchmark.train_point(args, "no-diffusion", 1e-3) is None  # would fail: no data to train on
        stale = {"pid": live.pid, "host": socket.gethostname(), "started": "another boot:1"}  # pid reused since
        (out / "claim.json").write_text(json.dumps(stale))
        with rd_benchmark.claimed(out) as mine:
            assert mine
    finally:
        live.kill()
        live.wait()
    with rd_benchmark.claimed(out) as mine:  # that process is gone now
        assert mine and json.loads((out / "claim.json").read_text())["pid"] == os.getpid()
        with rd_benchmark.claimed(out) as again:
            assert not again  # held by this process, which is alive
    assert not (out / "claim.json").exists()


def test_plot_validation_reads_the_training_logs(tmp_path):
    import plot_validation

    for name, psnr in (("a", 20.0), ("b", 21.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training.log").write_text(
            "10:00:00 diffusion-hyperprior: 1.00 M trainable parameters\n"
            f"10:00:01 epoch 0 step 100: train loss 0.1 bpp 0.5 psnr 15.0 | val loss 0.0200 bpp 0.800 psnr {psnr - 1} (best)\n"
            f"10:00:02 epoch 1 step 200: train loss 0.1 bpp 0.5 psnr 16.0 | val loss 0.0150 bpp 0.700 psnr {psnr}\n"
        )
    curves = plot_validation.main(["--output", str(tmp_path / "v.png"), f"A={tmp_path / 'a'}", f"B={tmp_path / 'b' / 'training.log'}"])
    assert curves["A"] == {"step": [100.0, 200.0], "loss": [0.02, 0.015], "bpp": [0.8, 0.7], "psnr": [19.0, 20.0]}
    assert curves["B"]["psnr"] == [20.5, 21.5]
    assert (tmp_path / "v.png").is_file() and json.loads((tmp_path / "v.json").read_text()) == curves


def test_plot_validation_counts_steps_in_the_reference_runs(tmp_path):
    import plot_validation

    def log(name, losses):
        lines = [f"10:00:00 epoch 0 step {100 * (i + 1)}: train loss 0.1 bpp 0.5 psnr 15.0 | val loss {loss} bpp 0.5 psnr 20.0"
                 for i, loss in enumerate(losses)]  # fmt: skip
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return f"{name}={tmp_path / name}"

    fast, slow = log("fast", [0.020, 0.010]), log("slow", [0.020, 0.015, 0.016, 0.009])
    curves = plot_validation.main(["--output", str(tmp_path / "v.png"), "--reference", "slow", "--every", "100", fast, slow])
    # the fast run's 0.010 at step 200 takes the slow one until step 400 (its noisy 0.016 does not count)
    assert curves["fast"]["equivalence"] == [
        {"step": 100.0, "best_loss": 0.02, "reference_step": 100.0, "ratio": 1.0},
        {"step": 200.0, "best_loss": 0.01, "reference_step": 400.0, "ratio": 2.0},
    ]
    assert "equivalence" not in curves["slow"]
    other_way = plot_validation.main(["--output", str(tmp_path / "w.png"), "--reference", "fast", "--every", "200", fast, slow])
    assert other_way["slow"]["equivalence"] == [
        {"step": 200.0, "best_loss": 0.015, "reference_step": 200.0, "ratio": 1.0},
        {"step": 400.0, "best_loss": 0.009, "reference_step": None, "ratio": None},  # never reached
    ]
    with pytest.raises(SystemExit, match="not one of the runs"):
        plot_validation.main(["--output", str(tmp_path / "x.png"), "--reference", "nobody", fast, slow])


def test_training_speed_reports_every_variant(image_dir, tmp_path):
    import training_speed

    out = tmp_path / "speed.json"
    result = training_speed.main(["--N", "8", "--M", "8", "--unet_channels", "8", "--crop", "64", "--batch_size", "2",
                                  "--steps", "1", "--threads", "1", "--train_data", str(image_dir), "--output", str(out),
                                  "--student_N", "8", "--student_M", "12", "--student_batch_size", "2"])  # fmt: skip
    assert set(result["images_per_second"]) == {"diffusion-hyperprior", "mbt2018-mean"}
    for row in result["images_per_second"].values():
        assert set(row) == set(training_speed.VARIANTS) and all(v > 0 for v in row.values())
    assert result["data_crops_per_second"] > 0 and json.loads(out.read_text()) == result
    assert set(result["student_images_per_second"]) == {"upsample then conv", "phase form"}
    assert all(v > 0 for v in result["student_images_per_second"].values())
    only = training_speed.main(["--parts", "student", "--crop", "32", "--steps", "1", "--threads", "1", "--output", str(out),
                                "--student_N", "8", "--student_M", "12", "--student_batch_size", "1"])  # fmt: skip
    assert "images_per_second" not in only and "data_crops_per_second" not in only and "student_images_per_second" in only


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_reference_benchmark_trains_fine_tunes_ships_and_reports(image_dir, tmp_path):
    import reference_benchmark

    kodak = tmp_path / "kodak"
    for i in range(2):
        write_image(kodak / f"kodim0{i}.png", (64, 96), seed=20 + i)
    argv = ["--train_data", str(image_dir), "--kodak", str(kodak), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--reference_dir", str(tmp_path / "ref"),
            "--lambdas", "1e-2", "1e-3", "--base_lambda", "1e-3", "--N", "8", "--M", "8", "--unet_channels", "8",
            "--base_steps", "2", "--finetune_steps", "1", "--crop_schedule", "64", "--finetune_crop_schedule", "64",
            "--image_size", "64", "--batch_size", "2", "--epoch_size", "4", "--warmup_steps", "1", "--threads", "1"]  # fmt: skip
    summary = reference_benchmark.main(argv)
    fine_tuned = json.loads((tmp_path / "runs" / "diffusion-hyperprior" / "lambda0.01" / "done.json").read_text())
    assert "--init_from" in fine_tuned["command"] and fine_tuned["step"] == 1
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["diffusion-hyperprior-lambda0.001.pth", "diffusion-hyperprior-lambda0.01.pth"]
    curves = summary["kodak"]["curves"]
    assert {"diffusion-hyperprior", "mbt2018-mean (same recipe)", "jpeg", "webp", "avif"} <= set(curves)
    assert len(curves["diffusion-hyperprior"]["results"]["bpp"]) == 2
    assert set(summary["kodak"]["bd_rate"]) == {"jpeg", "webp"} and set(summary["unseen"]["bd_rate"]) == {"jpeg", "webp"}
    assert len(summary["unseen"]["images"]) == 5 and len(summary["published"]) == 2
    assert (tmp_path / "results" / "reference_plot.png").is_file() and "vs jpeg" in (tmp_path / "results" / "reference.md").read_text()
    assert set(summary["validation"]) == {"diffusion-hyperprior", "mbt2018-mean"} and (tmp_path / "results" / "reference_val_curves.png").is_file()
    # measuring again ships into another folder: exactly the finished runs, an older curve's file removed,
    # an identical file left alone (its evaluation cache stays valid)
    other = tmp_path / "ship"
    other.mkdir()
    (other / "diffusion-hyperprior-lambda0.0023.pth").write_bytes(b"an older curve")
    reference_benchmark.main(argv + ["--no-training", "--reference_dir", str(other)])
    assert sorted(p.name for p in other.iterdir()) == ["diffusion-hyperprior-lambda0.001.pth", "diffusion-hyperprior-lambda0.01.pth"]
    before = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    reference_benchmark.main(argv + ["--no-training", "--reference_dir", str(other)])
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == before


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_gpu_stage_trains_every_rate_point_in_rounds_and_the_benchmark_ships_them(image_dir, tmp_path):
    """benchmarks/reference_gpu_stage.sh (here on the CPU): round 1 starts every run from stage 1's
    checkpoints, round 2 from round 1's run of the same rate point; --stage2_dir ships round 2."""
    import reference_benchmark

    kodak = tmp_path / "kodak"
    write_image(kodak / "kodim01.png", (64, 96), seed=30)
    argv = ["--train_data", str(image_dir), "--kodak", str(kodak), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--reference_dir", str(tmp_path / "ref"),
            "--lambdas", "1e-2", "1e-3", "--base_lambda", "1e-3", "--N", "8", "--M", "8", "--unet_channels", "8",
            "--base_steps", "2", "--finetune_steps", "1", "--crop_schedule", "64", "--finetune_crop_schedule", "64",
            "--image_size", "64", "--batch_size", "2", "--epoch_size", "4", "--warmup_steps", "1", "--threads", "1",
            "--no-evaluate"]  # fmt: skip
    reference_benchmark.main(argv)
    stage1 = {c: tmp_path / "runs" / c / "lambda0.001" / "best_checkpoint.pth" for c in ("diffusion-hyperprior", "mbt2018-mean")}
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "CROP": "64", "DOWNSCALE_MIN": "1", "BASE_LAMBDA": "1e-3", "BATCH_SIZE": "2", "EPOCH_SIZE": "2", "WORKERS": "0"}
    script = str(ROOT / "benchmarks" / "reference_gpu_stage.sh")
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for init, out in ((stage1, r1), ({c: r1 for c in stage1}, r2)):
        proc = subprocess.run(["bash", script, str(init["diffusion-hyperprior"]), str(init["mbt2018-mean"]), str(image_dir), str(out), "2",
                               "1e-2", "1e-3"], env=env, capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in out.glob("*.log"))
    for curve, lam in (("diffusion-hyperprior", "0.01"), ("diffusion-hyperprior", "0.001"), ("mbt2018-mean", "0.001")):
        done = json.loads((r2 / curve / f"lambda{lam}" / "done.json").read_text())
        assert done["init_from"] == str(r1 / curve / f"lambda{lam}" / "best_checkpoint.pth") and done["steps"] == 2
    assert json.loads((r1 / "mbt2018-mean" / "lambda0.001" / "done.json").read_text())["init_from"] == str(stage1["mbt2018-mean"])
    summary = reference_benchmark.main([a for a in argv if a != "--no-evaluate"] + ["--no-training", "--stage2_dir", str(r2)])
    shipped = lic_common.load_checkpoint(tmp_path / "ref" / "diffusion-hyperprior-lambda0.01.pth")["state_dict"]
    round2 = lic_common.load_checkpoint(r2 / "diffusion-hyperprior" / "lambda0.01" / "best_checkpoint.pth")["state_dict"]
    assert all(torch.equal(v, round2[k].half() if v.dtype == torch.float16 else round2[k]) for k, v in shipped.items())
    assert set(summary["runs"]) == {"diffusion-hyperprior/lambda0.01", "diffusion-hyperprior/lambda0.001", "mbt2018-mean/lambda0.001"}
    assert all(run["stage"] == 2 for run in summary["runs"].values())


def test_student_benchmark_trains_teacher_and_student_and_reports_every_stage(image_dir, tmp_path):
    import student_benchmark

    kodak = tmp_path / "kodak"
    for i in range(2):
        write_image(kodak / f"kodim0{i}.png", (64, 96), seed=30 + i)
    out = tmp_path / "results" / "student.json"
    argv = ["--train_data", str(image_dir), "--kodak", str(kodak), "--work_dir", str(tmp_path / "work"), "--output", str(out),
            "--N", "8", "--M", "8", "--teacher_steps", "2", "--teacher_crop", "64", "--distill_epochs", "1", "--finetune_epochs", "1",
            "--crops_per_epoch", "4", "--crop_size", "32", "--batch_size", "2", "--warmup_steps", "1", "--threads", "1",
            "--ship_dir", str(tmp_path / "ship"), "--finetune_lr", "3e-5"]  # fmt: skip
    result = student_benchmark.main(argv)
    # each stage trained at its own learning rate
    assert json.loads((tmp_path / "work" / "checkpoints" / "distill_config.json").read_text())["lr"] == 1e-4
    assert json.loads((tmp_path / "work" / "checkpoints_ft" / "finetune_config.json").read_text())["lr"] == 3e-5
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["bmshj2018-factorized-teacher.pth", "student-decoder.pth"]
    shipped = torch.load(tmp_path / "ship" / "student-decoder.pth", weights_only=True)
    assert shipped["decoder_only"] and all(k.startswith("g_s.") for k in shipped["student"])
    assert json.loads((tmp_path / "work" / "teacher_done.json").read_text())["step"] == 2
    for where in ("kodak", "unseen"):
        assert set(result[where]) == set(student_benchmark.STAGES)
        for r in result[where].values():
            assert r["student_decodes_teacher_bitstreams"] and abs(r["teacher_psnr"] - r["student_psnr"] - r["psnr_gap_db"]) < 1e-9
    # the initialised student is not the distilled one: training moved it
    assert result["kodak"]["initialised"]["student_psnr"] != result["kodak"]["distilled"]["student_psnr"]
    assert set(result["curves"]) == {"distill", "finetune"} and len(result["curves"]["distill"]) == 1
    assert (out.parent / "student_curves.png").is_file() and (out.parent / "student_crops.png").is_file()
    picture = json.loads(out.read_text())["picture"]
    assert picture["image"] == "kodim00.png" and picture["error_gain"] > 0  # automatic gain (--error_gain 0)
    assert picture["panels"][3].endswith(f"x{picture['error_gain']:.1f}")
    # the automatic gain puts the teacher's 99th-percentile error at full scale: about 1% of its error panel saturates
    size = 4 * picture["box"][2]
    panel = np.asarray(Image.open(out.parent / "student_crops.png"))[4 : 4 + size, 3 * (size + 8) + 4 : 3 * (size + 8) + 4 + size]
    assert 0.002 < (panel == 255).mean() < 0.03
    op = result["operating_point"]
    assert op["teacher"]["bpp"] == result["kodak"]["initialised"]["bpp"] and len(op["jpeg"]["bpp"]) == 4
    assert op["published_quality8"]["bpp"] > 1.5  # CompressAI's quality 8


@pytest.mark.slow  # probes: latents measured, a decoder fine-tuned, variants trained (about 12 s): -m slow
def test_codec_probes_measure_latents_finetune_the_decoder_alone_and_train_variants(image_dir, tmp_path):
    """benchmarks/codec_probes.py: the latents' errors are what their quantizers make; the decoder
    fine-tuning changes g_s and nothing else; a training variant runs (in its own process: it
    patches the modules it runs)."""
    import codec_probes
    import train_bk_sdm_compression as tr

    tiny = ["--N", "8", "--M", "8", "--diffusion_steps", "2", "--unet_channels", "8", "--image_size", "64", "--val_image_size", "64",
            "--batch_size", "2", "--num_workers", "0", "--warmup_steps", "1", "--no-progress", "--max_steps", "2", "--epochs", "1"]  # fmt: skip
    tr.main(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), *tiny])
    ckpt = str(tmp_path / "run" / "best_checkpoint.pth")
    got = codec_probes.main(["latents", ckpt, "--images", str(image_dir), "--max_images", "2"])
    assert got["exact"]["latent_mse"] == 0 and 0.04 < got["proxy"]["latent_mse"] < 0.13
    assert all(got[n]["latent_mse"] <= 0.25 and got[n]["bpp"] > 0 for n in ("chain", "chain_centroid", "mu0", "dither"))
    assert got["chain_centroid"]["bpp"] == got["chain"]["bpp"] and got["chain"]["latent_mse"] > 0

    image = torch.arange(16.0).view(1, 4, 4)
    tiles = codec_probes.centre_tiles(image, 2, 2)  # a 2 x 2 grid of 2 px tiles is the whole 4 px image
    assert len(tiles) == 4 and torch.equal(torch.cat([torch.cat(tiles[:2], 2), torch.cat(tiles[2:], 2)], 1), image)
    assert [t.shape[-1] for t in codec_probes.centre_tiles(image, 2, 3)] == [2]  # only the centre tile fits
    assert torch.equal(codec_probes.centre_tiles(image, 3, 2)[0], image[:, :3, :3]) and codec_probes.centre_tiles(image, 5, 1) == []
    sizes = codec_probes.main(["crop-sizes", ckpt, "--data_path", str(image_dir), "--sizes", "32", "64", "--grid", "2"])[ckpt]
    assert set(sizes) == {f"{s}px {m}" for s in (32, 64) for m in ("train", "eval", "transforms")}
    assert sizes["32px eval"]["tiles"] == 4 and sizes["64px eval"]["tiles"] == 1  # the held-out image is 72 x 80 px
    coded = [r for k, r in sizes.items() if not k.endswith("transforms")]
    assert all(0 < r["bpp"] < 30 and 0 < r["psnr"] < 60 and math.isclose(r["loss"], 10 ** (-r["psnr"] / 10) + 1.2e-3 * r["bpp"]) for r in coded)
    assert 0 < sizes["64px transforms"]["psnr"] < 60 and sizes["64px transforms"]["psnr"] != sizes["64px eval"]["psnr"]  # nothing quantized
    identity = torch.nn.Module()
    identity.g_a, identity.g_s = torch.nn.Identity(), torch.nn.Sequential(torch.nn.Identity())
    assert codec_probes.transforms_psnr(identity, torch.rand(1, 3, 8, 8)) == float("inf")  # g_s(g_a(x)) is compared with x itself
    assert sizes["64px train"]["bpp"] != sizes["64px eval"]["bpp"]  # the proxy's noise against rounding
    seen = codec_probes.main(["crop-sizes", ckpt, "--data_path", str(image_dir), "--sizes", "64", "--split", "training", "--max_images", "3"])[ckpt]
    assert seen["64px eval"]["tiles"] == 3 and seen["64px eval"]["psnr"] != sizes["64px eval"]["psnr"]  # other images

    out = tmp_path / "decoder.pth"
    codec_probes.main(["finetune-decoder", ckpt, str(out), "--data_path", str(image_dir), "--steps", "2", "--crop", "64", "--batch_size", "2"])
    before, after = lic_common.load_checkpoint(ckpt)["state_dict"], lic_common.load_checkpoint(out)["state_dict"]
    changed = {k for k, v in after.items() if not torch.equal(v.float(), before[k].float())}
    assert changed and all(k.startswith("g_s.") for k in changed)

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec_probes.py"), "train", "detach", "--",
                          "--data_path", str(image_dir), "--output_dir", str(tmp_path / "detach"), *tiny],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "detach" / "best_checkpoint.pth").is_file()


def test_codec_probes_unet_times_time_every_batch():
    import codec_probes

    result = codec_probes.main(["unet-times", "--N", "8", "--M", "8", "--unet_channels", "8", "--image_size", "64",
                                "--batches", "1", "3", "--timing_steps", "2"])  # fmt: skip
    assert set(result["seconds"]) == {1, 3} and all(t > 0 for t in result["seconds"].values())
    assert 0 < result["convolution_share"] < 1


def test_codec_probes_step_times_time_every_variant(monkeypatch):
    """``step-times``: a positive time for each model and precision asked for; ``--compile`` adds
    the compiled copies (a stand-in for torch.compile here: a real one takes minutes)."""
    import codec_probes

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    tiny = ["step-times", "--N", "8", "--M", "8", "--unet_channels", "8", "--batch_size", "2", "--image_size", "64", "--timing_steps", "2"]
    got = codec_probes.main([*tiny, "--precisions", "fp32", "--compile"])
    assert set(got) == {"fp32"} and len(compiled) == 3
    assert {"codec, 4 steps", "codec, 0 steps, compiled", "bmshj2018-hyperprior, compiled"} <= set(got["fp32"])
    assert all(t > 0 for t in got["fp32"].values()) and len(got["fp32"]) == 8


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_gpu_check_script_runs_every_stage_in_its_dry_mode(tmp_path):
    """scripts/gpu_check.sh --dry-run: the same stages as on a GPU, on the CPU with tiny settings."""
    ckpt = save_ckpt(perturbed(tiny_model()).eval(), tmp_path / "tiny.pth")
    for i in range(4):
        write_image(tmp_path / "imgs" / f"im{i}.png", (72, 80), seed=i)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--runs", str(tmp_path / "runs"),
                           "--checkpoint", str(ckpt), "--data", str(tmp_path / "imgs"), "--kodak", str(tmp_path / "imgs")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["tests", "exact_cuda", "speed", "train"]
    assert all(s["rc"] == 0 for s in summary["stages"])
    assert "ratios_vs_mbt2018-mean" in json.loads((out / "speed.json").read_text())
    assert json.loads((out / "exact_cuda.json").read_text())
    model, _ = bk.load_codec(out / "trained-lambda1.2e-3.pth")  # the trained run, slim, codes
    assert model.exact is not None


@pytest.mark.slow  # every entropy model trained and coded (about 30 s): -m slow
def test_prior_comparison_trains_every_entropy_model_on_the_same_latents_and_measures_real_files(image_dir, tmp_path):
    """Two tiny rate points; every prior trains on the same cached latents, codes real files
    (the first image of each set decoded from its bytes), and the summary holds the BD-rates."""
    import prior_comparison as pc

    ckpts = []
    for i in range(2):
        torch.manual_seed(i)
        ckpts.append(str(save_ckpt(perturbed(tiny_model(diffusion_steps=2)), tmp_path / f"diffusion-hyperprior-lambda0.00{i + 1}.pth")))
    kodak = tmp_path / "kodak"
    for i in range(2):
        write_image(kodak / f"kodim0{i + 1}.png", (64, 64), seed=i)
    summary = pc.main(["--checkpoints", *ckpts, "--data_path", str(image_dir), "--kodak", str(kodak), "--work_dir", str(tmp_path / "work"),
                       "--results", str(tmp_path / "res"), "--cache_latents", "8", "--image_size", "64", "--batch_size", "4",
                       "--minutes", "0.02", "--epoch_size", "48", "--variants", "diffusion-channels-4", "--max_images", "1"])  # fmt: skip
    assert set(summary["runs"]) == {"lambda0.001", "lambda0.002"}
    assert set(summary["runs"]["lambda0.002"]) == {"mean-scale", "diffusion-prior", "checkerboard", "elic", "diffusion-channels-4"}
    assert all(r["step"] > 0 and r["curve"] for point in summary["runs"].values() for r in point.values())
    for where in ("kodak", "unseen"):
        assert set(summary[where]["curves"]) == {"mean-scale", "diffusion-prior", "checkerboard", "elic", "diffusion-channels-4", "checkpoint"}
        assert set(summary[where]["bd_rate"]) == {"mean-scale", "checkerboard", "elic"}
        assert summary[where]["bd_rate"]["mean-scale"]["mean-scale"]["bd_rate_psnr"] == pytest.approx(0, abs=1e-9)
        for rows in summary[where]["per_point"].values():
            assert all(r["roundtrip"] is True and r["bpp"] > 0 for r in rows.values())
    # every model of a rate point trained on the one cache; bpp counts whole bytes, the estimate beside it
    latents = torch.load(tmp_path / "work" / "lambda0.001" / "latents.pth", weights_only=True)["latents"]
    assert latents.shape[0] == 8
    for r in summary["kodak"]["per_point"]["lambda0.001"].values():
        assert (r["bpp"] * 64 * 64 / 8).is_integer() and 0 < r["bpp_estimate"] != r["bpp"]
    assert json.loads((tmp_path / "res.json").read_text())["kodak"]["curves"].keys() == summary["kodak"]["curves"].keys()
    assert (tmp_path / "res.png").is_file() and "BD-rate" in (tmp_path / "res.md").read_text()
    # a second call trains and measures nothing again
    again = pc.main(["--checkpoints", *ckpts, "--data_path", str(image_dir), "--kodak", str(kodak), "--work_dir", str(tmp_path / "work"),
                     "--results", str(tmp_path / "res2"), "--cache_latents", "8", "--image_size", "64", "--variants",
                     "diffusion-channels-4", "--max_images", "1"])  # fmt: skip
    assert again["kodak"]["per_point"] == summary["kodak"]["per_point"]


@pytest.mark.slow  # a training run, real files and a timed layout (about 20 s): -m slow
def test_pretrained_exact_benchmark_trains_codes_and_times_a_real_layout(image_dir, tmp_path):
    """Both stages at tiny sizes: a BK-SDM-shaped codec trained by the training script codes an
    image with the exact and the float coder (bytes compared), and one step of a U-Net built from a
    configuration file is timed exact and float32, each in its own process."""
    import pretrained_exact_benchmark

    kodak = tmp_path / "kodak"
    write_image(kodak / "kodim01.png", (64, 96), seed=3)
    configs = tmp_path / "bk-sdm"
    configs.mkdir()
    tiny = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 16, "layers_per_block": 1, "attention_head_dim": 2, "norm_num_groups": 8,
            "use_linear_projection": True, "mid_block_type": None}  # fmt: skip
    (configs / "unet_small_v1.json").write_text(json.dumps(tiny))
    result = pretrained_exact_benchmark.main(["--train", str(image_dir), "--kodak", str(kodak), "--bk_sdm_configs", str(configs),
                                              "--train_steps", "2", "--image_size", "64", "--max_images", "1", "--latent_size", "16", "24",
                                              "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    rd = result["rd"]
    assert rd["images"] == 1 and rd["diffusion_steps"] == 4 and abs(rd["exact_over_float_payload"]) < 0.05
    assert rd["exact_bpp"] > rd["float_bpp"]  # the same strings but for rounding, and 14 more header bytes
    size = result["size"]["unet_small_v1.json"]
    assert size["exact"]["seconds"] > 0 and size["float"]["peak_rss_gb"] > 0 and size["exact_over_float_time"] > 0
    assert "unet_small_v2.json" not in result["size"] and (tmp_path / "out" / "pretrained_exact.md").is_file()


@pytest.mark.slow  # about twenty processes of the command line: -m slow
def test_large_image_benchmark_measures_sizes_batches_and_startup(tmp_path):
    """Every stage at tiny sizes: peak memory and time per size, the one-call batch against one
    call per image (identical files), --help of every script and the fixed cost of a call."""
    import large_image_benchmark as lib

    kodak = tmp_path / "kodak"
    for i in range(3):
        write_image(kodak / f"kodim0{i + 1}.png", (48, 64), seed=i)
    ckpt = save_ckpt(perturbed(tiny_model()).eval(), tmp_path / "tiny.pth")
    result = lib.main(["--checkpoint", str(ckpt), "--kodak", str(kodak), "--source", "kodim01.png", "--megapixels", "0.01", "0.02",
                       "--batch_images", "2", "--repeats", "1", "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "res")])  # fmt: skip
    sizes = result["sizes"]
    assert [round(r["pixels"], -2) for r in sizes] == [round(r["pixels"], -2) for r in sorted(sizes, key=lambda r: r["pixels"])]
    assert all(r[k]["peak_gib"] > 0.1 and r[k]["codec_s"] > 0 for r in sizes for k in ("compress", "decompress"))
    assert sizes[0]["compress"]["per_pixel_vs_smallest"] == 1 and sizes[0]["whole_is_the_same_file"] is True
    assert result["batch"]["identical_files"] is True and result["batch"]["images"] == 2
    assert set(result["startup"]["help_s"]) == set(lib.SCRIPTS) and result["startup"]["fixed_s"] > 0
    assert (tmp_path / "res" / "large_images.png").is_file() and "--help" in (tmp_path / "res" / "large_images.md").read_text()


@pytest.mark.slow  # two tiny checkpoints, efforts 0 and 1, Kodak-like and scikit-image's photographs: -m slow
def test_effort_benchmark_measures_every_level_caches_and_reports(tmp_path, monkeypatch):
    """BD-rate of effort 1 against 0 from real files at two rate points, encode and decode times,
    JPEG and WebP on the same images; a rerun reads the cache instead of coding again."""
    import effort_benchmark as eb
    from test_exact import TINY, trained_like

    kodak, ckpts = tmp_path / "kodak", []
    for i in range(2):
        write_image(kodak / f"kodim0{i + 1}.png", (64, 96), seed=i)
    for lam in (0.002, 0.02):
        model = trained_like(bk.create_diffusion_hyperprior_model(**TINY))
        model.calibrate([torch.rand(3, 64, 64)])
        model.update(force=True)
        ckpts.append(tmp_path / f"codec-{lam}.pth")
        lic_common.save_checkpoint(bk.slim_checkpoint(model.checkpoint_payload(), half=False) | {"lambda_rate": lam}, ckpts[-1])
    argv = ["--checkpoints", *map(str, ckpts), "--kodak", str(kodak), "--images", "1", "--efforts", "0", "1", "--threads", "1",
            "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "res")]  # fmt: skip
    summary = eb.main(argv)
    assert summary["images"] == ["kodim01.png"] and [lv["effort"] for lv in summary["levels"]] == [0, 1]
    zero, one = summary["levels"]
    assert zero["against_effort_0"]["bd_rate_psnr"] == pytest.approx(0, abs=1e-9) and one["encode_ratio"] > 1
    assert set(one["against"]) == {"JPEG", "WebP"} and one["decode_ratio"] > 0
    assert "| 1 | 4 |" in (tmp_path / "res" / "effort.md").read_text() and (tmp_path / "res" / "effort.png").is_file()
    monkeypatch.setattr(bk, "encode_image", lambda *a, **k: pytest.fail("a cached measurement was coded again"))
    assert eb.main(argv)["levels"][1]["curve"] == one["curve"]
    monkeypatch.undo()
    unseen = eb.main([*argv[: argv.index("--kodak")], "--unseen", "--efforts", "0", *argv[argv.index("--threads") :], "--tag", "_u"])
    assert summary["set"] == "Kodak images" and unseen["set"] == "unseen photographs" and len(unseen["images"]) == 5
    assert "unseen photographs" in (tmp_path / "res" / "effort_u.md").read_text()

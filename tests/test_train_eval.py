"""Training and evaluation scripts: checkpoints, resume, DDP, bad input, metrics, BD-rate."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import bk_sdm_compression as bk
import evaluate_bk_sdm_compression as ev
import lic_common
import train_bk_sdm_compression as tr
from conftest import ROOT, write_image

TINY = ["--N", "8", "--M", "8", "--diffusion_steps", "2", "--unet_channels", "8", "--image_size", "64",
        "--val_image_size", "64", "--batch_size", "2", "--num_workers", "0", "--warmup_steps", "2",
        "--no-progress", "--lr", "1e-3"]  # fmt: skip


def run_train(data, out, *extra):
    return tr.main(["--data_path", str(data), "--output_dir", str(out), *TINY, *extra])


def test_training_writes_everything_and_resume_continues(image_dir, tmp_path):
    out = tmp_path / "run"
    result = run_train(image_dir, out, "--epochs", "2", "--save_every", "1")
    # 6 images, 1 held out: 5 per epoch, batch 2 -> 3 steps an epoch
    assert result["step"] == 6 and result["epoch"] == 2
    for name in ("config.json", "training.log", "last_checkpoint.pth", "best_checkpoint.pth",
                 "checkpoint_0.pth", "checkpoint_1.pth"):  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.*"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch0000.png", "epoch0001.png"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["codec"]["N"] == 8 and config["args"]["lambda_rate"] == 1e-4
    # the log keeps losses to 6 decimals (a well-trained codec's loss is ~0.002: 4 decimals flatten its curve)
    assert re.search(r"val loss \d\.\d{6} bpp", (out / "training.log").read_text())

    last = lic_common.load_checkpoint(out / "last_checkpoint.pth")
    assert last["run_state"]["step"] == 6
    assert last["optimizer"]["state"], "optimizer moments are saved"
    # the auxiliary optimizer holds exactly the entropy bottleneck's quantiles
    model = bk.from_config(bk.CodecConfig.from_dict(last["config"]))
    main_params, aux_params = tr.split_parameters(model)
    assert [p is model.entropy_bottleneck.quantiles for p in aux_params] == [True]
    assert len(last["aux_optimizer"]["param_groups"][0]["params"]) == 1
    assert not any(p is model.entropy_bottleneck.quantiles for p in main_params)

    # the best checkpoint is ready to compress, through the command line
    src = write_image(tmp_path / "x.png", (40, 52))
    bk.main(["compress", str(src), str(tmp_path / "x.bin"), "--checkpoint", str(out / "best_checkpoint.pth")])
    bk.main(["decompress", str(tmp_path / "x.bin"), str(tmp_path / "y.png"), "--checkpoint", str(out / "best_checkpoint.pth")])

    resumed = run_train(image_dir, out, "--epochs", "3", "--resume", "last")
    assert resumed["step"] == 9 and resumed["epoch"] == 3
    step2 = lic_common.load_checkpoint(out / "last_checkpoint.pth")["optimizer"]["state"]
    first_param = next(iter(step2))
    assert step2[first_param]["step"].item() == 9  # Adam's count went on from 6, not from 0


def test_resume_keeps_the_runs_settings_and_refuses_another_experiment(image_dir, tmp_path, capsys):
    """Resumed with only the data flags, a run keeps its lambda, crops and batch (not the defaults);
    a flag that may change (the epochs) overrides with a printed line, one that may not is refused."""
    out = tmp_path / "run"
    run_train(image_dir, out, "--epochs", "1", "--lambda_rate", "1e-2")
    base = ["--data_path", str(image_dir), "--output_dir", str(out), "--resume", "last", "--num_workers", "0", "--no-progress"]
    result = tr.main([*base, "--epochs", "2"])
    assert result["step"] == 6 and result["epoch"] == 2
    saved = json.loads((out / "config.json").read_text())["args"]
    assert (saved["lambda_rate"], saved["image_size"], saved["batch_size"], saved["epochs"]) == (1e-2, 64, 2, 2)
    assert saved["N"] == 8 and json.loads((out / "config.json").read_text())["model"]["codec"]["N"] == 8
    assert "resume: --epochs 2 (the run had 1)" in capsys.readouterr().out
    for flag, value in (("--lambda_rate", "1e-3"), ("--image_size", "128"), ("--batch_size", "4")):
        with pytest.raises(SystemExit) as exc:
            tr.main([*base, "--epochs", "3", flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "differs from the resumed run" in err and flag in err
    with pytest.raises(SystemExit) as exc:
        tr.main(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "none"), "--resume", "last"])
    assert exc.value.code == 2 and "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGTERM, signal.SIGTERM)])
def test_signal_stops_saves_and_resumes_exactly(image_dir, tmp_path, monkeypatch, signals):
    """Ctrl-C or SIGTERM mid-epoch finishes the step, saves, and exits 130; resuming gives
    bit-identical weights to a run that was never stopped. A second signal stops at once and
    leaves the checkpoint saved before."""
    run_train(image_dir, tmp_path / "straight", "--epochs", "2")

    calls = {"n": 0}
    original = tr.RateDistortionLoss.forward

    def signal_mid_epoch(self, out, x, lambdas=None):
        calls["n"] += 1  # calls 1-3: epoch 0's steps, 4: its validation, 5: step 4, 6: step 5
        if calls["n"] == 6:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return original(self, out, x, lambdas)

    monkeypatch.setattr(tr.RateDistortionLoss, "forward", signal_mid_epoch)
    with pytest.raises(SystemExit) as exc:
        run_train(image_dir, tmp_path / "cut", "--epochs", "2")
    assert exc.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    saved = lic_common.load_checkpoint(tmp_path / "cut" / "last_checkpoint.pth")["run_state"]
    # one signal: step 5 completes, then the run saves; two: it stops inside step 5, unsaved
    assert (saved["step"], saved["epoch"], saved["batches_done"]) == ((5, 1, 2) if len(signals) == 1 else (3, 1, 0))
    monkeypatch.setattr(tr.RateDistortionLoss, "forward", original)
    run_train(image_dir, tmp_path / "cut", "--epochs", "2", "--resume", "last")

    a = lic_common.load_checkpoint(tmp_path / "straight" / "last_checkpoint.pth")["state_dict"]
    b = lic_common.load_checkpoint(tmp_path / "cut" / "last_checkpoint.pth")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_train(image_dir, out, "--epochs", "1")
    before = (out / "last_checkpoint.pth").read_bytes()
    original = tr.RateDistortionLoss.forward

    def nan_loss(self, out_, x, lambdas=None):
        losses = original(self, out_, x, lambdas)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(tr.RateDistortionLoss, "forward", nan_loss)
    with pytest.raises(SystemExit) as exc:
        run_train(image_dir, out, "--epochs", "2", "--resume", "last")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "last_checkpoint.pth" in err
    assert (out / "last_checkpoint.pth").read_bytes() == before


def test_corrupt_and_small_images_are_handled(image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_image(image_dir / "tiny.png", (20, 30))  # smaller than the 64 px crop
    with pytest.warns(UserWarning, match="broken.png"):
        result = run_train(image_dir, tmp_path / "run", "--epochs", "1", "--epoch_size", "16", "--val_fraction", "0.01")
    assert result["step"] == 8 and math.isfinite(result["best_loss"])


def test_compressai_architecture_trains_and_loads_in_compressai(image_dir, tmp_path):
    run_train(image_dir, tmp_path / "hp", "--model", "bmshj2018-hyperprior", "--epochs", "1")
    ckpt = lic_common.load_checkpoint(tmp_path / "hp" / "best_checkpoint.pth")
    from compressai.zoo.image import model_architectures

    model = model_architectures["bmshj2018-hyperprior"].from_state_dict(ckpt["state_dict"])  # as eval_model does
    assert model.g_a[0].out_channels == 8
    # the evaluation script names the --model_path curve after the checkpoint's architecture
    summary = ev.main(["--model_path", str(tmp_path / "hp" / "best_checkpoint.pth"), "--data_path", str(image_dir),
                       "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    assert (tmp_path / "eval" / "bmshj2018-hyperprior.json").is_file() and "diffusion-hyperprior" not in json.dumps(summary)


def test_sampler_is_deterministic_and_split_across_ranks():
    s0 = tr.SeededSampler(5, 7, seed=3, rank=0, world=2)
    s1 = tr.SeededSampler(5, 7, seed=3, rank=1, world=2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 4 and list(s0) == a
    assert sorted(i for i, _, _ in a + b)[:7] != []  # every rank gets a share
    s0.set_epoch(0, skip=2)
    assert list(s0) == a[2:]
    s0.set_epoch(1)
    assert list(s0) != a


def test_crop_schedule_follows_the_training_step_across_epochs():
    schedule = tr.CropSchedule("32,48@3,64@5")
    assert [schedule(step) for step in range(7)] == [32, 32, 32, 48, 48, 64, 64]
    for bad in ("32@2", "32,48@0", "32,48@4,64@4", "x"):
        with pytest.raises(ValueError, match="crop schedule"):
            tr.CropSchedule(bad)
    # 5 items per epoch in batches of 2: 3 steps an epoch, so epoch 1 holds steps 3, 4, 5
    sampler = tr.SeededSampler(5, 5, seed=0, crop_schedule=schedule, batch_size=2)
    sampler.set_epoch(1)
    assert [c for _, _, c in sampler] == [48, 48, 48, 48, 64]
    sampler.set_epoch(1, skip=4)  # resuming mid-epoch keeps each item's step
    assert [c for _, _, c in sampler] == [64]


def test_downscaled_crops_are_smoother_and_the_right_size(tmp_path):
    torch.manual_seed(0)
    noise = torch.rand(3, 128, 160)
    lic_common.save_image(noise, tmp_path / "noise.png")
    plain = tr.ImageFolderCrops([tmp_path / "noise.png"], 32, train=True)
    half = tr.ImageFolderCrops([tmp_path / "noise.png"], 32, train=True, downscale=(0.5, 0.5))
    a, b = plain[(0, 7, 48)], half[(0, 7, 48)]
    assert a.shape == b.shape == (3, 48, 48)
    assert torch.equal(plain[(0, 7, 48)], a)  # the seed alone decides the crop
    # a 2x antialiased downscale averages pixel pairs: white noise loses much of its variance
    assert b.var() < 0.6 * a.var()
    for bad in (["--downscale_min", "0.8", "--downscale_max", "0.5"], ["--crop_schedule", "64@10"]):
        with pytest.raises(SystemExit):
            tr.parse_args(["--data_path", str(tmp_path), *bad])


def test_training_with_a_crop_schedule_and_downscaling(image_dir, tmp_path):
    result = run_train(image_dir, tmp_path / "run", "--epochs", "2", "--crop_schedule", "32,64@3",
                       "--downscale_min", "0.5", "--downscale_max", "1")  # fmt: skip
    assert result["step"] == 6 and math.isfinite(result["best_loss"])


def test_sampled_teacher_forcing_trains_one_unet_pass_per_image(image_dir, tmp_path, monkeypatch):
    """``--teacher_forcing sampled`` reaches the model: its training passes hold the batch, not
    steps x the batch; ``--decoder_ste_from`` (which needs every step's means) is refused with it."""
    batches = []
    build = tr.build_model

    def recording_build(config):
        model = build(config)
        model.unet.register_forward_hook(lambda m, a, o: batches.append((m.training, a[0].shape[0])))
        return model

    monkeypatch.setattr(tr, "build_model", recording_build)
    result = run_train(image_dir, tmp_path / "run", "--epochs", "1", "--teacher_forcing", "sampled")
    assert math.isfinite(result["best_loss"])
    assert max(n for training, n in batches if training) == 2  # batch 2 (1 at an epoch's end), S = 2: all steps would pass 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["teacher_forcing"] == "sampled"
    with pytest.raises(SystemExit):
        tr.parse_args(["--data_path", ".", "--teacher_forcing", "sampled", "--decoder_ste_from", "0.5"])


def test_compile_trains_through_the_compiled_module_and_saves_the_plain_one(image_dir, tmp_path, monkeypatch):
    """``--compile``: the training steps call what ``torch.compile`` returned (a stand-in here: a
    real compile takes minutes on a CPU; the slow test below runs one), and the checkpoints hold
    the model's own state, not the wrapper's (whose keys start with ``_orig_mod.``)."""

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module as ``_orig_mod``
        def __init__(self, module):
            super().__init__()
            self._orig_mod, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self._orig_mod(*args, **kwargs)

    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: wrappers.append(Compiled(module)) or wrappers[-1])
    result = run_train(image_dir, tmp_path / "run", "--epochs", "1", "--compile")
    assert math.isfinite(result["best_loss"]) and len(wrappers) == 1 and wrappers[0].calls == result["step"] == 3
    state = lic_common.load_checkpoint(tmp_path / "run" / "last_checkpoint.pth")["state_dict"]
    assert state.keys() == wrappers[0]._orig_mod.state_dict().keys() and not any("_orig_mod" in k for k in state)
    run_train(image_dir, tmp_path / "plain", "--epochs", "1")
    assert len(wrappers) == 1  # off by default


@pytest.mark.slow
def test_compile_really_compiles_and_trains(image_dir, tmp_path):
    result = run_train(image_dir, tmp_path / "run", "--epochs", "1", "--compile", "--no-amp")
    assert result["step"] == 3 and math.isfinite(result["best_loss"])
    assert bk.load_codec(tmp_path / "run" / "best_checkpoint.pth")[0].config.diffusion_steps == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_only_rank0_writes(image_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "train_bk_sdm_compression.py"),
           "--data_path", str(image_dir), "--output_dir", str(out), "--device", "cpu", "--epochs", "2", *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    assert log.count("2 process(es)") == 1 and log.count("done:") == 1
    # 5 training images over 2 ranks: ceil(5/2) = 3 per rank, batch 2 -> 2 steps an epoch
    assert lic_common.load_checkpoint(out / "last_checkpoint.pth")["run_state"]["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best_checkpoint.pth", "config.json", "last_checkpoint.pth", "samples", "tensorboard", "training.log"]
    )


# ---- evaluation ----


def test_evaluation_json_csv_real_bytes_and_roundtrip(image_dir, tmp_path, capsys):
    run_train(image_dir, tmp_path / "run", "--epochs", "1")
    ckpt = tmp_path / "run" / "best_checkpoint.pth"
    data = tmp_path / "eval_images"
    write_image(data / "a.png", (48, 64), seed=1)
    write_image(data / "b.png", (48, 64), seed=2)
    out = tmp_path / "ev"
    summary = ev.main(["--model_path", str(ckpt), "--data_path", str(data), "--output_dir", str(out),
                       "--classical", "jpeg", "--jpeg_qualities", "20", "60", "--save_samples"])  # fmt: skip
    curve = json.loads((out / "diffusion-hyperprior.json").read_text())
    assert {"name", "description", "results"} <= curve.keys()
    assert {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"} <= curve["results"].keys()

    # bpp is the file's real size, header included
    model, _ = bk.load_codec(ckpt)
    sizes = [len(bk.encode_image(model, lic_common.load_image(data / n))) for n in ("a.png", "b.png")]
    assert curve["results"]["bpp"][0] == pytest.approx(np.mean([8 * s / (48 * 64) for s in sizes]))
    assert summary["roundtrip_mismatches"] == 0
    # the ideal code length under the coder's tables is below the file by at most its header and flushes
    table = curve["results"]["bpp-table"][0]
    assert 0 < table < curve["results"]["bpp"][0] <= table + 8 * 79 / (48 * 64)
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 2 * 2 and rows[0].startswith("curve,point,image,bpp,bpp_estimate,psnr")
    captured = capsys.readouterr()
    assert "6/6" in captured.err  # a progress bar over curves and images: 3 points x 2 images
    assert (out / "rd_plot.png").stat().st_size > 1000
    assert (out / "samples" / "diffusion-hyperprior" / "run_best_checkpoint" / "a_error.png").is_file()
    assert set(summary["bd_rates"]) == {"diffusion-hyperprior", "jpeg"}
    # printed against the anchor (the first curve), not against itself; a single point is n/a, not nan
    printed = [line for line in captured.out.splitlines() if line.startswith("BD-rate vs")]
    assert len(printed) == 1 and "jpeg" in printed[0] and "n/a" in printed[0] and "nan" not in printed[0]


def test_table_code_bits_is_what_the_range_coder_writes():
    from compressai import ans
    from compressai.entropy_models import GaussianConditional

    gc = GaussianConditional([0.2, 0.5, 1.0, 2.0, 5.0])
    gc.update()
    rng = np.random.default_rng(0)
    indexes = rng.integers(0, 5, 20000)
    symbols = np.round(rng.standard_normal(20000) * np.array([0.2, 0.5, 1.0, 2.0, 5.0])[indexes]).astype(int)
    symbols[:50] = rng.integers(-3000, 3000, 50)  # outside every table: escape-coded
    tables = gc._quantized_cdf.tolist(), gc._cdf_length.tolist(), gc._offset.tolist()
    real = 8 * len(ans.RansEncoder().encode_with_indexes(symbols.tolist(), indexes.tolist(), *tables))
    ideal = ev.table_code_bits(symbols, indexes, *tables)
    assert 0 <= real - ideal <= 64 + 32  # the coder's final 64-bit state, written in 32-bit words
    symbols[:50] = 0
    assert ideal - ev.table_code_bits(symbols, indexes, *tables) > 50 * 20  # the escapes were counted


def test_metered_coders_count_bits_and_leave_the_bytes_alone():
    from compressai.zoo import bmshj2018_hyperprior

    model = bmshj2018_hyperprior(quality=1).eval()
    model.update(force=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = model.compress(x)["strings"]
        with ev.metered_coders(model) as metered:
            assert model.compress(x)["strings"] == plain
            bits = metered()
    real = sum(8 * len(s[0]) for s in plain)
    assert 0 < bits <= real <= bits + 2 * (64 + 32)
    assert not isinstance(model.entropy_bottleneck.entropy_coder, ev.CodeLengthMeter)  # restored


def test_bd_rate_matches_independent_values():
    psnr = np.array([28.0, 30.0, 32.0, 34.0])
    rate = np.array([0.2, 0.35, 0.6, 1.0])
    # the same qualities at 10% fewer bits: exactly -10% whatever the interpolation
    assert ev.bd_rate(rate, psnr, rate * 0.9, psnr) == pytest.approx(-10.0, abs=1e-9)
    # log-linear curves log R = a + b Q, the test one 1 dB better: BD-rate = exp(-b) - 1
    b = 0.25
    q = np.linspace(28, 36, 5)
    anchor = np.exp(-8 + b * q)
    test = np.exp(-8 + b * (q - 1.0))
    assert ev.bd_rate(anchor, q, test, q) == pytest.approx((math.exp(-b) - 1) * 100, rel=1e-6)
    assert math.isnan(ev.bd_rate(rate, psnr, rate, psnr + 20))  # no overlap


def test_evaluation_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    write_image(tmp_path / "imgs" / "a.png")
    lic_common.save_checkpoint({"foo": 1}, tmp_path / "x.pth")
    with pytest.raises(SystemExit):
        ev.main(["--curve", f"c={tmp_path / 'x.pth'}", "--data_path", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "o")])
    assert "unknown architecture" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["mbt2018-mean", "mbt2018", "bmshj2018-hyperprior"])
def test_compressai_entropy_models_stay_fp32_under_cpu_autocast(arch):
    """--amp trains under bfloat16 autocast on the CPU too; the rate term is computed in fp32
    (without the wrapper the entropy bottleneck's matrices would run in bfloat16)."""
    model = tr.build_model({"architecture": arch, "N": 8, "M": 8}).train()
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["x_hat"].dtype == torch.bfloat16  # the transforms did run in bfloat16
    assert all(p.dtype == torch.float32 for p in out["likelihoods"].values())
    # the same latent gives the same likelihoods under autocast as without: no bfloat16 CDFs
    model.eval()
    with torch.no_grad():
        z = model.h_a(model.g_a(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, under_autocast = model.entropy_bottleneck(z)
        assert torch.equal(under_autocast, model.entropy_bottleneck(z)[1])


def test_cpu_amp_trains_the_codec_in_bfloat16(image_dir, tmp_path, capsys):
    trainer = tr.Trainer(tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), *TINY, "--max_steps", "1"]))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    x = torch.rand(2, 3, 64, 64)
    with trainer.autocast():
        out = trainer.model.train()(x)
    assert out["x_hat"].dtype == torch.bfloat16 and out["likelihoods"]["y"].dtype == torch.float32
    with pytest.raises(SystemExit):
        tr.main(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "r2"), *TINY, "--amp_dtype", "float16"])
    assert "--amp on the CPU takes --amp_dtype bfloat16" in capsys.readouterr().err


def test_emulated_cpu_bfloat16_is_detected_and_warned_about(image_dir, tmp_path, monkeypatch):
    assert lic_common.cpu_bf16_is_native("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n") is True
    assert lic_common.cpu_bf16_is_native("processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512_vnni\n") is False
    assert lic_common.cpu_bf16_is_native("Features\t: fp asimd sve bf16\n") is True
    assert lic_common.cpu_bf16_is_native("model name\t: something\n") is None
    cpu = torch.device("cpu")
    monkeypatch.setattr(lic_common, "cpu_bf16_is_native", lambda cpuinfo=None: True)
    assert lic_common.cpu_amp_warning(cpu, True) is None
    monkeypatch.setattr(lic_common, "cpu_bf16_is_native", lambda cpuinfo=None: False)
    assert lic_common.cpu_amp_warning(cpu, False) is None
    run_train(image_dir, tmp_path / "run", "--max_steps", "1", "--epochs", "1")  # --amp is the default
    assert "emulates bfloat16, slower than fp32; consider --no-amp" in (tmp_path / "run" / "training.log").read_text()


def test_init_from_starts_a_new_run_from_another_runs_model(image_dir, tmp_path):
    run_train(image_dir, tmp_path / "a", "--epochs", "1")
    source = lic_common.load_checkpoint(tmp_path / "a" / "last_checkpoint.pth")
    args = tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "b"), *TINY, "--N", "16",
                          "--lambda_rate", "1e-2", "--init_from", str(tmp_path / "a" / "last_checkpoint.pth")])  # fmt: skip
    trainer = tr.Trainer(args)
    assert trainer.config == source["run_config"]["model"] and trainer.state.step == 0  # the sizes come from the checkpoint
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source["state_dict"].items() if k in state)
    with pytest.raises(lic_common.CheckpointError, match="not a training checkpoint"):
        lic_common.save_checkpoint({"state_dict": {}}, tmp_path / "bare.pth")
        tr.Trainer(tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "c"), *TINY, "--init_from", str(tmp_path / "bare.pth")]))


def test_init_from_takes_a_codec_checkpoint_such_as_a_shipped_one(image_dir, tmp_path):
    run_train(image_dir, tmp_path / "a", "--epochs", "1")
    slim = bk.slim_checkpoint(lic_common.load_checkpoint(tmp_path / "a" / "best_checkpoint.pth"))
    lic_common.save_checkpoint(slim, tmp_path / "slim.pth")
    trainer = tr.Trainer(tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "b"), *TINY,
                                        "--init_from", str(tmp_path / "slim.pth")]))  # fmt: skip
    assert trainer.config["codec"] == slim["config"] and trainer.state.step == 0
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in slim["state_dict"].items())


@pytest.mark.parametrize("flags", [["--N", "0"], ["--lambda_rate", "-1"], ["--val_fraction", "1.5"], ["--epochs", "0"],
                                   ["--batch_size", "0"], ["--calibration_crops", "0"]])  # fmt: skip
def test_training_flags_out_of_range_are_refused_before_anything_starts(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "run"), *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--threads", "-3"], ["--jpeg_qualities", "150"], ["--curve", "x="], ["--diffusion_steps", "-1"]])
def test_evaluation_flags_out_of_range_are_refused(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.parse_args(["--data_path", str(tmp_path), *flags])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_evaluation_refuses_an_unknown_anchor_before_measuring(tmp_path, capsys):
    write_image(tmp_path / "imgs" / "a.png", (32, 32))
    with pytest.raises(SystemExit) as exc:
        ev.main(["--data_path", str(tmp_path / "imgs"), "--classical", "jpeg", "--jpeg_qualities", "50",
                 "--anchor", "foo", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert exc.value.code == 2 and "--anchor 'foo'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_training_with_pretrained_parts_missing_is_one_line(image_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        run_train(image_dir, tmp_path / "run", "--epochs", "1", "--use_pretrained_vae", "--bk_sdm_path", str(tmp_path / "empty"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: could not load BK-SDM") and err.count("\n") == 1


def test_init_transforms_from_compressais_zoo_copies_and_freezes(image_dir, tmp_path, monkeypatch):
    """The real pretrained call (compressai.zoo, pretrained=True), offline: torch.hub's download
    answered with a saved state dict of mbt2018-mean quality 1 (N=128, M=192)."""
    import compressai.zoo.image as zoo
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(1)
    source = MeanScaleHyperprior(128, 192).state_dict()
    asked = []
    monkeypatch.setattr(zoo, "load_state_dict_from_url", lambda url, progress=True: asked.append(url) or source)
    args = tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), *TINY, "--N", "128", "--M", "192",
                          "--init_transforms", "mbt2018-mean:1", "--freeze", "g_a", "g_s"])  # fmt: skip
    trainer = tr.Trainer(args)
    assert asked and "mbt2018-mean" in asked[0]
    state = trainer.model.state_dict()
    for k in ("g_a.0.weight", "g_s.6.bias", "h_a.4.weight", "h_s.4.weight", "entropy_bottleneck.matrices.0"):
        assert torch.equal(state[k], source[k]), k
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in [*trainer.model.g_a.parameters(), *trainer.model.g_s.parameters()])
    assert all(id(p) in trained for p in trainer.model.h_s.parameters())


def test_init_transforms_from_a_compressai_training_checkpoint_and_a_size_mismatch(image_dir, tmp_path, capsys):
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(1)
    source = MeanScaleHyperprior(8, 8)
    torch.save({"epoch": 3, "state_dict": source.state_dict(), "loss": 1.0}, tmp_path / "checkpoint.pth.tar")  # examples/train.py's layout
    trainer = tr.Trainer(tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), *TINY,
                                        "--init_transforms", str(tmp_path / "checkpoint.pth.tar")]))  # fmt: skip
    assert torch.equal(trainer.model.g_a[0].weight, source.g_a[0].weight)
    with pytest.raises(SystemExit) as exc:
        run_train(image_dir, tmp_path / "other", "--N", "16", "--init_transforms", str(tmp_path / "checkpoint.pth.tar"))
    assert exc.value.code == 2 and "build the codec with the source's --N and --M" in capsys.readouterr().err


def _mean_scale_checkpoint(path, N=8, M=8):
    """A checkpoint of CompressAI's examples/train.py holding a (random) mbt2018-mean."""
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(1)
    source = MeanScaleHyperprior(N, M)
    torch.save({"epoch": 3, "state_dict": source.state_dict(), "loss": 1.0}, path)
    return source


def test_cache_latents_trains_the_entropy_model_alone_on_the_frozen_latents(image_dir, tmp_path, monkeypatch):
    source = _mean_scale_checkpoint(tmp_path / "ms.pth.tar")
    cache = tmp_path / "cache" / "latents.pth"
    frozen = ["--init_transforms", str(tmp_path / "ms.pth.tar"), "--freeze", "g_a", "g_s", "--cache_latents", "8", "--latent_cache", str(cache)]
    result = run_train(image_dir, tmp_path / "run", *frozen, "--epochs", "2")
    assert result["step"] == 8 and "val_bpp" in result and "val_psnr" not in result  # 8 latents, batch 2, 2 epochs
    train_latents = torch.load(cache, weights_only=True)["latents"]
    val_latents = torch.load(cache.with_name("latents_val.pth"), weights_only=True)["latents"]
    assert train_latents.shape == (8, 8, 4, 4) and val_latents.shape == (1, 8, 4, 4)  # 64 px crops, one validation image

    # the cached latents are the frozen g_a's of the seeded training crops
    trainer = tr.Trainer(tr.parse_args(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "probe"), *TINY]))
    crops = tr.ImageFolderCrops(trainer.train_files, 64, train=True)
    items = list(tr.SeededSampler(len(trainer.train_files), 8, 42, crop_schedule=tr.CropSchedule("64")))
    with torch.no_grad():
        expected = source.g_a(torch.stack([crops[i] for i in items[:3]]))
    torch.testing.assert_close(train_latents[:3], expected, rtol=1e-5, atol=1e-5)

    # g_a and g_s stay the source's; the entropy model trained
    state = lic_common.load_checkpoint(tmp_path / "run" / "last_checkpoint.pth")["state_dict"]
    assert torch.equal(state["g_a.0.weight"], source.g_a[0].weight) and torch.equal(state["g_s.6.bias"], source.g_s[6].bias)
    assert not torch.equal(state["h_s.4.weight"], source.h_s[4].weight)
    assert not torch.equal(state["unet.conv_out.weight"], torch.zeros_like(state["unet.conv_out.weight"]))

    # a second run on the same transform and crops reads the cache: no crop is decoded again
    monkeypatch.setattr(tr.ImageFolderCrops, "__getitem__", lambda self, item: pytest.fail("latents recomputed"))
    assert run_train(image_dir, tmp_path / "again", *frozen, "--epochs", "1")["step"] == 4
    # the best checkpoint codes real files
    src = write_image(tmp_path / "x.png", (40, 52))
    monkeypatch.undo()
    bk.main(["compress", str(src), str(tmp_path / "x.bin"), "--checkpoint", str(tmp_path / "run" / "best_checkpoint.pth")])
    bk.main(["decompress", str(tmp_path / "x.bin"), str(tmp_path / "y.png"), "--checkpoint", str(tmp_path / "run" / "best_checkpoint.pth")])


def test_cache_latents_needs_frozen_transforms_and_patience_stops_a_stalled_run(image_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(["--data_path", str(image_dir), "--cache_latents", "8", "--freeze", "g_a"])
    assert exc.value.code == 2 and "--cache_latents trains the entropy model alone: it needs --freeze g_a g_s" in capsys.readouterr().err
    # a validation loss that never improves after the first: --patience 2 stops two validations later
    monkeypatch.setattr(tr.Trainer, "evaluate", lambda self, epoch: {"loss": 1.0, "bpp": 1.0, "mse": 0.0, "psnr": 0.0})
    result = run_train(image_dir, tmp_path / "run", "--epochs", "10", "--patience", "2")
    assert result["epoch"] == 3 and result["stale_validations"] == 2
    assert "has not improved for 2 validations" in (tmp_path / "run" / "training.log").read_text()


def test_the_codec_forward_on_a_latent_is_its_entropy_model():
    model = bk.create_diffusion_hyperprior_model(N=8, M=8, diffusion_steps=2, unet_channels=8).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        whole, latent = model(x), model(model.g_a(x), latent=True)
    assert "x_hat" not in latent
    for k in ("y", "z"):
        torch.testing.assert_close(latent["likelihoods"][k], whole["likelihoods"][k])

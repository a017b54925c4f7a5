"""Variable rate: one checkpoint, a continuous quality recorded in the file, exact at every
quality, rate monotone in it, and the search for a target size or PSNR."""

import json
import math
import sys
import zlib

import pytest
import torch

import bk_sdm_compression as bk
import lic_common
import train_bk_sdm_compression as tr
from conftest import ROOT, write_image
from test_exact import TINY, run, trained_like
from test_train_eval import TINY as TRAIN_TINY

LAMBDAS = [8e-3, 2e-3, 5e-4, 1.25e-4]


def variable_model():
    """A tiny variable-rate model with latents large enough that the quality moves the rate."""
    model = trained_like(bk.create_diffusion_hyperprior_model(**TINY, quality_lambdas=LAMBDAS))
    with torch.no_grad():
        model.g_a[-1].weight.mul_(30)
        model.log_steps.copy_(tr.initial_log_steps(LAMBDAS, 2e-3, TINY["M"]))
    model.calibrate([torch.rand(3, 64, 64) for _ in range(2)])
    model.update(force=True)
    return model


@pytest.fixture(scope="module")
def model():
    return variable_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("variable") / "codec.pth"
    lic_common.save_checkpoint(bk.slim_checkpoint(model.checkpoint_payload(), half=False), path)
    return path


def rewrite_quality(data: bytes, code: int) -> bytes:
    """The file with another quality in its header, its CRC made valid again."""
    at = bk._HEADER.size - 7  # the quality, then the z digest (4 bytes) and the flags (1)
    body = data[:at] + code.to_bytes(2, "big") + data[at + 2 : -4]
    return body + bk._CRC.pack(zlib.crc32(body))


def test_the_quality_round_trips_through_the_header(model):
    x = torch.rand(3, 48, 64)
    for quality in (1.0, 1.7, 2.5, 4.0):
        data = bk.encode_image(model, x, quality=quality)
        header, _ = bk.read_bitstream(data)
        assert header.quality_code == round((quality - 1) * 256) and header.quality == pytest.approx(quality, abs=1 / 256)
        assert bk.decode_image(model, data).shape == x.shape  # the decoder takes the quality from the file


def test_rate_falls_monotonically_as_quality_falls(model):
    x = torch.rand(3, 64, 64)
    qualities = [1 + i * 0.25 for i in range(13)]  # between and on the trained levels
    sizes = [len(bk.encode_image(model, x, quality=q)) for q in qualities]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] > 1.5 * sizes[0]
    y = model.g_a(x[None])
    errors = [(model.compress(x[None], quality=q)["y_hat"] - y).pow(2).mean() for q in (1, 4)]
    assert errors[1] < errors[0] / 4  # finer steps: a closer latent


def test_every_quality_decodes_to_the_encoders_latent_and_picture(model):
    x = torch.rand(3, 40, 56)
    for quality in (1.0, 1.33, 2.0, 3.99, 4.0):
        data, picture = bk.encode_image(model, x, quality=quality, reconstruct=True)
        assert torch.equal(bk.decode_image(model, data), picture)


def test_a_files_quality_cannot_be_overridden_into_a_wrong_decode(model):
    data = bk.encode_image(model, torch.rand(3, 64, 64), quality=2.5)
    header, _ = bk.read_bitstream(data)
    with pytest.raises(bk.BitstreamError, match="latent checksum mismatch"):
        bk.decode_image(model, rewrite_quality(data, header.quality_code + 1))
    with pytest.raises(bk.BitstreamError, match="at one rate"):
        bk.decode_image(model, rewrite_quality(data, bk.NO_QUALITY))
    with pytest.raises(bk.BitstreamError, match="qualities 1 to 4"):
        bk.decode_image(model, rewrite_quality(data, 5 * 256))


def test_fixed_and_variable_rate_refuse_each_others_qualities(model):
    fixed = trained_like(bk.create_diffusion_hyperprior_model(**TINY))
    fixed.update(force=True)
    with pytest.raises(ValueError, match="one rate"):
        fixed.compress(torch.rand(1, 3, 64, 64), quality=2.0)
    with pytest.raises(ValueError, match=r"quality in \[1, 4\]"):
        model.compress(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"quality in \[1, 4\]"):
        model.compress(torch.rand(1, 3, 64, 64), quality=4.5)


def test_variable_rate_files_decode_the_same_in_other_process_configurations(checkpoint, tmp_path):
    image = write_image(tmp_path / "photo.png", (64, 80))
    run(checkpoint, dict(threads=2, jobs=[("encode", image, tmp_path / "a.bksd", 2.37)]))
    run(checkpoint, dict(jobs=[("decode", tmp_path / "a.bksd", tmp_path / "x0.pt", None)]),  # decode_image checks the digest
        dict(threads=2, onednn=False, channels_last=True, jobs=[("decode", tmp_path / "a.bksd", tmp_path / "x1.pt", None)]))
    assert torch.load(tmp_path / "x0.pt").shape == (3, 64, 80)


@pytest.mark.parametrize("kind,target", [("size", 0.6), ("psnr", None)])
def test_the_target_search_meets_its_tolerance_on_a_small_image(model, kind, target):
    x = torch.rand(3, 64, 64)
    lo, hi = (bk.encode_image(model, x, quality=q, reconstruct=True) for q in (1.0, 4.0))
    if kind == "size":  # a size between the extremes
        target = len(lo[0]) + target * (len(hi[0]) - len(lo[0]))
    else:
        target = (lic_common.psnr(x[None], lo[1][None]) + lic_common.psnr(x[None], hi[1][None])) / 2
    found = bk.encode_to_target(model, x, kind, target)
    assert found.met and found.encodes <= 8
    if kind == "size":
        assert abs(len(found.data) - target) <= 0.02 * target
    else:
        assert abs(lic_common.psnr(x[None], bk.decode_image(model, found.data)[None]) - target) <= 0.1
    if kind == "size":  # at an effort: the quality searched at effort 0, the file coded once more at the effort
        model.lambda_rate = None  # a variable-rate model's rate weight is its quality's
        searched = bk.encode_to_target(model, x, kind, target, effort=1)
        assert searched.encodes == found.encodes + 1 and searched.quality == found.quality
        assert searched.met or abs(len(searched.data) - target) <= abs(len(found.data) - target)
        assert bk.decode_image(model, searched.data).shape == x.shape
    beyond = bk.encode_to_target(model, x, "size", 10 * len(hi[0]))  # out of range: the closest, and says so
    assert not beyond.met and beyond.quality == 4.0 and beyond.encodes == 2


def test_the_command_line_codes_at_a_quality_or_a_target(checkpoint, tmp_path, capsys):
    image = write_image(tmp_path / "photo.png", (64, 64))
    out = bk.main(["compress", str(image), str(tmp_path / "a.bksd"), "--checkpoint", str(checkpoint), "--quality", "3.1"])
    assert out["quality"] == pytest.approx(3.1, abs=1 / 256)
    assert bk.main(["decompress", str(tmp_path / "a.bksd"), str(tmp_path / "a.png"), "--checkpoint", str(checkpoint)])["quality"] == out["quality"]
    out = bk.main(["compress", str(image), str(tmp_path / "b.bksd"), "--checkpoint", str(checkpoint), "--target_bpp", "1.0"])
    assert "encodes" in out and out["bytes"] == (tmp_path / "b.bksd").stat().st_size
    for flags, message in ([[], "variable-rate: give --quality"], [["--quality", "0"], "must be > 0"],
                           [["--quality", "9"], "quality in [1, 4]"], [["--quality", "2", "--target_psnr", "30"], "not allowed"]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            bk.main(["compress", str(image), str(tmp_path / "c.bksd"), "--checkpoint", str(checkpoint), *flags])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err or message == "not allowed"


def test_training_a_variable_rate_model_from_a_fixed_rate_checkpoint(image_dir, tmp_path):
    fixed = tmp_path / "fixed"
    tr.main(["--data_path", str(image_dir), "--output_dir", str(fixed), *TRAIN_TINY, "--epochs", "1"])
    out = tmp_path / "variable"
    result = tr.main(["--data_path", str(image_dir), "--output_dir", str(out), *TRAIN_TINY, "--epochs", "2", "--rate_levels", "3",
                      "--lambda_max", "1e-2", "--lambda_min", "1e-4", "--lambda_rate", "1e-3",
                      "--init_from", str(fixed / "best_checkpoint.pth")])  # fmt: skip
    assert {"val_q1_bpp", "val_q2_bpp", "val_q3_bpp", "val_q1_psnr"} <= set(result)
    config = json.loads((out / "config.json").read_text())["model"]["codec"]
    assert config["quality_lambdas"] == [1e-2, 1e-3, 1e-4]
    model, _ = bk.load_codec(out / "best_checkpoint.pth")
    assert model.config.rate_levels == 3 and model.exact.log_steps.shape == (3, 8)
    # the quantization steps started from sqrt(lambda / lambda_rate): quality 1 coarsest
    steps = model.log_steps.detach().mean(1)
    assert steps[0] > steps[1] > steps[2] and math.isclose(steps[0].item(), 0.5 * math.log(10), abs_tol=0.1)
    image = write_image(tmp_path / "photo.png", (64, 64))
    sizes = [bk.main(["compress", str(image), str(tmp_path / f"{q}.bksd"), "--checkpoint", str(out / "best_checkpoint.pth"),
                      "--quality", str(q)])["bytes"] for q in (1, 3)]  # fmt: skip
    assert sizes[0] <= sizes[1]


def test_the_evaluation_sweeps_qualities_of_one_checkpoint_into_one_curve(checkpoint, tmp_path, capsys):
    import evaluate_bk_sdm_compression as ev

    for i in range(2):
        write_image(tmp_path / "imgs" / f"im{i}.png", (64, 64), seed=i)
    out = tmp_path / "eval"
    ev.main(["--model_path", str(checkpoint), "--label", "variable", "--qualities", "1", "2.5", "4", "--data_path", str(tmp_path / "imgs"),
             "--output_dir", str(out), "--device", "cpu"])  # fmt: skip
    curve = json.loads((out / "variable.json").read_text())["results"]
    assert len(curve["bpp"]) == 3 and curve["bpp"] == sorted(curve["bpp"]) and curve["bpp"][0] < curve["bpp"][-1]
    assert [p.rsplit("@", 1)[1] for p in curve["points"]] == ["q1", "q2.5", "q4"]
    with pytest.raises(SystemExit) as exc:
        ev.main(["--model_path", str(checkpoint), "--qualities", "5", "--data_path", str(tmp_path / "imgs"), "--output_dir", str(out)])
    assert exc.value.code == 2 and "qualities in [1, 4]" in capsys.readouterr().err


def test_the_variable_rate_benchmark_reports_bd_rates_and_the_target_search(checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import variable_rate_benchmark

    for i in range(2):
        write_image(tmp_path / "kodak" / f"im{i}.png", (64, 64), seed=i)
    common = ["--checkpoint", str(checkpoint), "--kodak", str(tmp_path / "kodak"), "--no-unseen", "--qualities", "1", "2", "3", "4"]
    first = variable_rate_benchmark.main([*common, "--target_bpp", "1.0", "--output", str(tmp_path / "a.json")])
    # the same checkpoint's curve as the "fixed-rate" one: BD-rate 0
    stored = {"sets": {"kodak": ["im0.png", "im1.png"]}, "curves": {"kodak": {"exact": first["curves"]["kodak"]["variable-rate"]}}}
    (tmp_path / "fixed.json").write_text(json.dumps(stored))
    result = variable_rate_benchmark.main([*common, "--fixed_curve", str(tmp_path / "fixed.json"), "--target_bpp", "1.0",
                                           "--output", str(tmp_path / "b.json")])  # fmt: skip
    assert abs(result["bd_rate"]["kodak"]["fixed-rate"]) < 1e-6 and {"jpeg", "webp"} <= set(result["bd_rate"]["kodak"])
    target = result["target_size"]["1"]
    assert target["images"] == 2 and target["max_encodes"] <= 8 and len(target["per_image"]) == 2
    assert (tmp_path / "b.md").read_text().startswith("Variable-rate checkpoint") and (tmp_path / "b.png").stat().st_size > 0


def test_the_demo_shows_a_variable_rate_checkpoint_at_several_qualities(checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    image = write_image(tmp_path / "photo.png", (64, 64))
    result = demo.main(["--output_dir", str(tmp_path / "demo"), "--checkpoint", str(checkpoint), "--qualities", "1", "4",
                        "--images", str(image)])  # fmt: skip
    ours = [r for r in result["rows"] if r["codec"] == "diffusion-hyperprior"]
    assert [r["setting"].rsplit("@", 1)[1] for r in ours] == ["q1", "q4"] and ours[0]["bytes"] <= ours[1]["bytes"]
    assert len(result["rows"]) == 6  # JPEG and WebP at the size of each file

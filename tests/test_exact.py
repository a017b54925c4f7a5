"""The exact integer entropy model: files decode to the same latent whatever the thread count,
oneDNN setting, memory format or batch, and a decoder that reaches another latent refuses."""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import bk_sdm_compression as bk
import lic_common
from conftest import ROOT, write_image

TINY = dict(N=16, M=24, diffusion_steps=4, unet_channels=16)


def trained_like(model, scale=0.05):
    """A tiny model whose U-Net and h_s are off their initialisation, as training moves them."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in [*model.unet.parameters(), *model.h_s.parameters()]:
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def exact_model(calibrate=True, **kw):
    model = trained_like(bk.create_diffusion_hyperprior_model(**{**TINY, **kw}))
    if calibrate:
        model.calibrate([torch.rand(3, 64, 64) for _ in range(2)])
    model.update(force=True)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("exact") / "codec.pth"
    lic_common.save_checkpoint(bk.slim_checkpoint(exact_model().checkpoint_payload(), half=False), path)
    return path


# ---- integer arithmetic ----


def test_integer_helpers_are_exact():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2**62, (4000,), generator=g, dtype=torch.int64)
    v = torch.cat([v, torch.tensor([0, 1, 2, 3, 4, 2**62 - 1, (2**31 - 1) ** 2, 2**31 * 2**31 - 1])])
    assert bk._isqrt(v).tolist() == [math.isqrt(int(a)) for a in v]
    a = torch.randint(-(2**40), 2**40, (2000,), generator=g)
    b = torch.randint(1, 2**20, (2000,), generator=g)
    assert bk._div(a, b).tolist() == [(2 * int(x) + int(y)) // (2 * int(y)) for x, y in zip(a, b)]
    assert bk._shift(a, 3).tolist() == [(int(x) + 4) >> 3 for x in a]
    assert bk._shift(a, -2).tolist() == [int(x) * 4 for x in a]


def test_function_tables_are_correctly_rounded():
    silu = bk._silu_table()
    assert silu[0] == round(-16 / (1 + math.exp(16)) * 2**bk.LOG_BITS)
    assert silu[len(silu) // 2] == 0  # SiLU(0)
    ln, ln2 = bk._ln_table()
    assert ln2 == round(math.log(2) * 2**bk.LOG_BITS) and ln[0] == 0
    assert abs(int(ln[2048]) - math.log(1.5) * 2**bk.LOG_BITS) <= 0.5


def test_integer_convolution_matches_conv2d():
    x = torch.randint(-(2**19), 2**19, (2, 96, 5, 7)).double()
    for out in (16, 96):
        layer = torch.nn.Conv2d(96, out, 3, padding=1)
        w = torch.randint(-(2**15), 2**15, (out, 96, 3, 3)).double()
        assert torch.equal(bk._integer_conv(x, w, layer), torch.nn.functional.conv2d(x, w, padding=1))


def test_the_integer_walk_is_the_float_unet():
    """The op sequence the integer form follows is diffusers' U-Net's: run in float it gives the same output."""
    model = exact_model(calibrate=False)
    x = torch.randn(2, 4 * TINY["M"], 4, 6)
    t = model.step_timesteps[torch.tensor([0, 3])]
    ops = bk._FloatOps(bk.unet_time_tables(model.unet, t))
    walked = bk._walk_unet(ops, model.unet, x.double()).float()
    assert torch.allclose(walked, model.unet(x, t).sample, atol=1e-5)


def test_exact_chain_is_close_to_the_float_chain():
    model = exact_model()
    x = torch.rand(1, 3, 64, 96)
    enc = model.compress(x)
    dec = model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])
    assert dec["digests"] == enc["digests"]
    y_float = model(x)["y_hat"]
    assert (dec["y_hat"] - y_float).abs().max() < 1e-2  # a few latents may round the other way


def test_batch_codes_each_image_as_alone():
    model = exact_model()
    x = torch.rand(3, 3, 64, 64)
    together = model.compress(x)
    for i in range(3):
        alone = model.compress(x[i : i + 1])
        assert alone["digests"][0] == together["digests"][i]
        assert [s[0] for s in alone["strings"]] == [s[i] for s in together["strings"]]


# ---- files across process configurations ----

RUN = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
torch.backends.mkldnn.enabled = {onednn}
import bk_sdm_compression as bk, lic_common
model, _ = bk.load_codec({ckpt!r})
if {channels_last}:
    model = model.to(memory_format=torch.channels_last)
for kind, source, target, quality in {jobs!r}:
    if kind == "encode":
        open(target, "wb").write(bk.encode_image(model, lic_common.load_image(source), quality=quality))
    else:  # decode_image checks the latent's digest
        torch.save(bk.decode_image(model, open(source, "rb").read()), target)
"""


def run(ckpt, *processes: dict) -> None:
    """Fresh processes, started together and all waited for, each a configuration
    (``threads``, ``onednn``, ``channels_last``) that loads ``ckpt`` and runs its ``jobs`` in order:
    ("encode", image, file, quality) or ("decode", file, picture.pt, None)."""
    procs = []
    for p in processes:
        cfg = {"threads": 1, "onednn": True, "channels_last": False} | p
        jobs = [(kind, str(a), str(b), q) for kind, a, b, q in cfg["jobs"]]
        code = RUN.format(root=str(ROOT), threads=cfg["threads"], onednn=cfg["onednn"], ckpt=str(ckpt),
                          channels_last=cfg["channels_last"], jobs=jobs)  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def check_files_cross_process_configurations(checkpoint, tmp_path) -> bytes:
    """A file encoded with 2 threads is the one encoded with 1 thread, oneDNN off and channels_last;
    it decodes (the latent digest checked) with 1 thread, with 2 threads and oneDNN off, and with 1
    thread, oneDNN off and channels_last, to pictures within float rounding of the synthesis.
    Returns the file."""
    image = write_image(tmp_path / "photo.png", (72, 104))
    a, b, xs = tmp_path / "a.bksd", tmp_path / "b.bksd", [tmp_path / f"x{i}.pt" for i in range(3)]
    run(checkpoint, dict(threads=2, jobs=[("encode", image, a, None)]))
    run(checkpoint, dict(jobs=[("decode", a, xs[0], None)]), dict(threads=2, onednn=False, jobs=[("decode", a, xs[1], None)]),
        dict(onednn=False, channels_last=True, jobs=[("encode", image, b, None), ("decode", a, xs[2], None)]))  # fmt: skip
    data = a.read_bytes()
    assert data == b.read_bytes()
    decoded = [torch.load(x) for x in xs]
    for x in decoded[1:]:
        mse = (x - decoded[0]).pow(2).mean().item()
        assert mse == 0 or 10 * math.log10(1 / mse) >= 60
    return data


def test_a_file_decodes_to_the_same_latent_in_every_process_configuration(checkpoint, tmp_path):
    check_files_cross_process_configurations(checkpoint, tmp_path)


def move_means_by_one_unit(monkeypatch):
    """Every seventh mean one unit in the last place off, as another platform's float arithmetic would move it."""
    predict = bk.ExactPrior.predict

    def off_by_one(self, *args, denoise=False, **kwargs):
        if denoise:
            return predict(self, *args, denoise=True, **kwargs)
        means, log_scales = predict(self, *args, **kwargs)
        return means + (torch.arange(means.numel()).view_as(means) % 7 == 0), log_scales

    monkeypatch.setattr(bk.ExactPrior, "predict", off_by_one)


def test_a_decoder_with_other_entropy_parameters_refuses_the_file(checkpoint, tmp_path, monkeypatch):
    """One unit in the last place of the means, as another platform's float arithmetic would move them."""
    model, _ = bk.load_codec(checkpoint)
    data = bk.encode_image(model, torch.rand(3, 64, 64))
    assert bk.decode_image(model, data).shape == (3, 64, 64)
    move_means_by_one_unit(monkeypatch)
    with pytest.raises(bk.BitstreamError, match="latent checksum mismatch"):
        bk.decode_image(model, data)


def test_the_command_line_refuses_a_wrong_decode_without_writing(checkpoint, tmp_path):
    image = write_image(tmp_path / "photo.png", (64, 64))
    coded, png = tmp_path / "f.bksd", tmp_path / "out.png"
    bk.main(["compress", str(image), str(coded), "--checkpoint", str(checkpoint)])
    data = bytearray(coded.read_bytes())
    digest_at = bk._HEADER.size - 15  # the digest, then the quality (2 bytes), the z digest (4) and the flags (1)
    data[digest_at] ^= 1  # the digest no longer matches the latent (CRC made valid again)
    body = bytes(data[:-4])
    coded.write_bytes(body + bk._CRC.pack(__import__("zlib").crc32(body)))
    r = subprocess.run([sys.executable, str(ROOT / "bk_sdm_compression.py"), "decompress", str(coded), str(png),
                        "--checkpoint", str(checkpoint)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "checksum" in r.stderr and "Traceback" not in r.stderr
    assert not png.exists()


# ---- encoder effort: the latent search ----

SEARCH_LAMBDA = 0.01


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A checkpoint recording its rate weight, whose latent carries enough bits for the search to
    trade (g_a's output scaled up, g_s's input scaled down), and a picture; -> (path, model, x)."""
    model = trained_like(bk.create_diffusion_hyperprior_model(**TINY))
    with torch.no_grad():
        model.g_a[-1].weight.mul_(20)
        model.g_s[0].weight.div_(20)
    model.calibrate([torch.rand(3, 64, 64) for _ in range(2)])
    model.update(force=True)
    path = tmp_path_factory.mktemp("effort") / "codec.pth"
    lic_common.save_checkpoint(bk.slim_checkpoint(model.checkpoint_payload(), half=False) | {"lambda_rate": SEARCH_LAMBDA}, path)
    model, _ = bk.load_codec(path)
    return path, model, lic_common.load_image(write_image(path.parent / "photo.png", (72, 104)))


def real_cost(model, x, data):
    x_hat = bk.decode_image(model, data)
    return (x_hat - x).square().mean().item() + SEARCH_LAMBDA * 8 * len(data) / (x.shape[1] * x.shape[2])


def test_the_search_rounds_in_expectation_and_anneals_to_the_coders_rounding():
    r = torch.tensor([-1.3, 0.2, 0.5, 0.8, 2.0])
    warm, cold = bk.soft_round(r, 0.5), bk.soft_round(r, 1e-3)
    assert torch.allclose(cold, torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]), atol=1e-4)  # the hard rounding; a tie is halfway
    assert torch.allclose(warm[2], torch.tensor(0.5)) and bool((warm.diff() > 0).all())  # monotone
    off = [0, 1, 3]  # neither integers nor ties: drawn toward the nearest integer, not onto it
    assert bool(((warm - r.round()).abs()[off] < (r - r.round()).abs()[off]).all()) and bool((warm[off] != r.round()[off]).all())
    assert torch.equal(bk.soft_round(r, 0.5), warm)  # deterministic
    x = r.clone().requires_grad_()
    bk.soft_round(x, 0.5).sum().backward()
    assert bool((x.grad[:4] > 0).all()) and x.grad[2] == x.grad.max()  # steepest at the tie


def test_the_search_lowers_the_real_cost_and_effort_keeps_the_better_file(searched):
    path, model, x = searched
    assert model.lambda_rate == SEARCH_LAMBDA and model.rate_weight() == SEARCH_LAMBDA
    amortized = bk.encode_image(model, x)
    assert bk.encode_image(model, x, effort=0) == amortized
    header = bk.read_bitstream(amortized)[0]

    def coded(latents):  # the file encode_image writes for these latents
        out = model.compress(x[None], None, latents)
        return bk.write_bitstream(dataclasses.replace(header, digest=out["digests"][0], z_digest=out["z_digests"][0]),
                                  [s[0] for s in out["strings"]])  # fmt: skip

    assert coded(None) == amortized
    searched_file = coded(model.search(x[None], bk.EFFORT_ITERATIONS[2]))
    assert real_cost(model, x, searched_file) < real_cost(model, x, amortized)
    assert len(searched_file) < len(amortized)
    assert bk.encode_image(model, x, effort=2) == searched_file  # the lower real cost is kept
    # a searched latent that costs more than the amortized one is not kept
    worse = coded((model.analyze(x[None]) + 3, None))
    assert real_cost(model, x, worse) > real_cost(model, x, amortized)


def test_files_of_every_effort_decode_to_the_same_latent_in_every_process_configuration(searched, tmp_path):
    path, model, x = searched
    files = [tmp_path / f"e{effort}.bksd" for effort in (1, 2)]
    for effort, f in zip((1, 2), files):
        f.write_bytes(bk.encode_image(model, x, effort=effort))
    xs = [[tmp_path / f"{f.stem}-{i}.pt" for i in range(2)] for f in files]
    run(path, dict(threads=2, onednn=False, jobs=[("decode", f, out[0], None) for f, out in zip(files, xs)]),
        dict(onednn=False, channels_last=True, jobs=[("decode", f, out[1], None) for f, out in zip(files, xs)]))  # fmt: skip
    for f, out in zip(files, xs):  # decode_image checked each latent's digest; the pictures agree to float rounding
        here = bk.decode_image(model, f.read_bytes())
        assert all((torch.load(o) - here).abs().max() < 1e-3 for o in out)


def test_the_command_line_codes_at_an_effort_within_its_limits(searched, checkpoint, tmp_path, monkeypatch, capsys):
    path, model, x = searched
    image = write_image(tmp_path / "photo.png", (72, 104))
    out = tmp_path / "f.bksd"
    result = bk.main(["compress", str(image), str(out), "--checkpoint", str(path)])  # the default effort
    assert result["effort"] == bk.DEFAULT_EFFORT > 0 and out.read_bytes() == bk.encode_image(model, x, effort=bk.DEFAULT_EFFORT)
    assert f"effort {bk.DEFAULT_EFFORT}" in capsys.readouterr().out
    monkeypatch.setattr(bk, "SEARCH_MAX_PIXELS", 64 * 64)  # over the search's limit: effort 0, said in one line
    assert bk.main(["compress", str(image), str(out), "--checkpoint", str(path), "--effort", "2"])["effort"] == 0
    assert out.read_bytes() == bk.encode_image(model, x) and "over the latent search's 4096 pixels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most 4096 pixels"):
        bk.encode_image(model, x, effort=1)
    monkeypatch.undo()  # a checkpoint that does not record its rate weight codes at effort 0, and says so
    assert bk.main(["compress", str(image), str(out), "--checkpoint", str(checkpoint), "--effort", "2"])["effort"] == 0
    assert "does not record the rate weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bk.parse_args(["compress", str(image), str(out), "--checkpoint", str(path), "--effort", str(len(bk.EFFORT_ITERATIONS))])
    # the evaluation script measures our curve at an effort too
    import evaluate_bk_sdm_compression as ev

    assert ev.parse_args(["--data_path", str(tmp_path), "--effort", "1"]).effort == 1
    codec = ev.LearnedCodec("ours", "p", model, torch.device("cpu"), effort=1)
    assert codec.code(x)[0] == bk.encode_image(model, x, effort=1)


# ---- formats ----


def test_float_checkpoints_and_files_of_format_2_are_refused_with_what_to_do(checkpoint, tmp_path):
    ckpt = lic_common.load_checkpoint(checkpoint)
    old = {k: v for k, v in ckpt.items() if k not in ("exact", "calibration")} | {"codec_format": 2}
    lic_common.save_checkpoint(old, tmp_path / "old.pth")
    with pytest.raises(lic_common.CheckpointError, match="convert"):
        bk.load_codec(tmp_path / "old.pth")
    model, _ = bk.load_codec(checkpoint)
    data = bytearray(bk.encode_image(model, torch.rand(3, 64, 64)))
    data[4] = 2
    with pytest.raises(bk.BitstreamError, match="encode the image again"):
        bk.read_bitstream(bytes(data))
    # and the convert command turns the float checkpoint into one that codes
    images = tmp_path / "train"
    for i in range(2):
        write_image(images / f"t{i}.png", (96, 96), seed=i)
    bk.main(["convert", str(tmp_path / "old.pth"), str(tmp_path / "new.pth"), "--data", str(images), "--crops", "2"])
    new, _ = bk.load_codec(tmp_path / "new.pth")
    x = torch.rand(3, 64, 64)
    assert bk.decode_image(new, bk.encode_image(new, x)).shape == x.shape


def test_a_checkpoint_stores_what_the_decoder_would_otherwise_compute(checkpoint):
    """Loading recomputes nothing in floating point: the tables come from the file."""
    ckpt = lic_common.load_checkpoint(checkpoint)
    model, _ = bk.load_codec(checkpoint)
    fresh = bk._rebuild(ckpt)
    fresh.update(force=True)  # recomputed here: equal on this machine, but the loaded model did not need it
    assert torch.equal(model.gaussian_conditional._quantized_cdf, fresh.gaussian_conditional._quantized_cdf)
    assert model.exact.exponents == fresh.exact.exponents
    for name, table in model.exact.norms.items():
        assert torch.equal(table["scale"], fresh.exact.norms[name]["scale"])


# ---- the benchmark and the device check ----


@pytest.mark.slow  # a benchmark script end to end (about a minute): -m slow
def test_exact_benchmark_measures_rd_speed_and_cross_decoding(checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import exact_benchmark

    kodak = tmp_path / "kodak"
    for i in range(2):
        write_image(kodak / f"k{i}.png", (64, 96), seed=i)
    ckpts = [str(checkpoint)] * 1
    result = exact_benchmark.main(["--checkpoints", *ckpts, "--kodak", str(kodak), "--no-unseen",
                                   "--output_dir", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.json")])  # fmt: skip
    cross = result["cross_configuration"][f"{checkpoint.name}|kodak"]
    assert cross["images"] == 2 and set(cross["refused"].values()) == {0}
    assert cross["batched_images"] == 2 and cross["batch_digest_mismatches"] == 0
    assert cross["lowest_psnr_between_decodes"] >= 60
    c = result["curves"]["kodak"]
    assert len(c["exact"]["bpp"]) == 1 and abs(c["exact"]["bpp"][0] - c["float"]["bpp"][0]) < 0.2 * c["float"]["bpp"][0]
    assert result["speed"]["decode_s"]["ratio"] > 0 and (tmp_path / "out" / "exact.md").is_file()


def test_device_check_runs_on_the_cpu(checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import exact_cuda_check

    write_image(tmp_path / "imgs" / "a.png", (64, 64))
    out = exact_cuda_check.main(["--checkpoints", str(checkpoint), "--kodak", str(tmp_path / "imgs"), "--devices", "cpu",
                                 "--output", str(tmp_path / "cuda.json")])  # fmt: skip
    assert out[checkpoint.name]["refused"] == [] and out[checkpoint.name]["files_differing_between_settings"] == 0


def check_files_cross_cpu_and_cuda(checkpoint, tmp_path):
    """Files coded on the CPU and on CUDA (TF32 on and off) decode everywhere to the encoder's latent.
    Files may differ by encoder (the analysis transform is floating point); every decode must agree."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import exact_cuda_check

    for i in range(2):
        write_image(tmp_path / "imgs" / f"{i}.png", (96, 128), seed=i)
    out = exact_cuda_check.main(["--checkpoints", str(checkpoint), "--kodak", str(tmp_path / "imgs")])
    result = out[checkpoint.name]
    assert result["refused"] == [] and result["lowest_psnr_between_decodes"] >= 60


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_files_cross_between_cpu_and_cuda_with_tf32_on_and_off(checkpoint, tmp_path):
    check_files_cross_cpu_and_cuda(checkpoint, tmp_path)


@pytest.mark.parametrize("config", [dict(reveal="channels"), dict(latent_denoise=True), dict(mode="z_only"),
                                    dict(diffusion_steps=2, unet_levels=3)])  # fmt: skip
def test_every_from_scratch_configuration_codes_exactly(config):
    model = exact_model(**config)
    x = torch.rand(2, 3, 64, 80)
    enc = model.compress(x)
    dec = model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])
    assert dec["digests"] == enc["digests"] and dec["x_hat"].shape == x.shape
    assert (dec["y_hat"] - model(x)["y_hat"]).abs().max() < 0.05 or config.get("mode") == "z_only"


def test_pretrained_vae_with_the_scratch_unet_codes_exactly(tiny_bk_sdm):
    model = trained_like(bk.create_bk_sdm_compression_model(str(tiny_bk_sdm), N=16, diffusion_steps=2, use_pretrained_vae=True,
                                                            unet_channels=8))  # fmt: skip
    model.update(force=True)
    x = torch.rand(1, 3, 64, 64)
    enc = model.compress(x)
    assert model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])["digests"] == enc["digests"]


def test_a_unet_the_integer_walk_does_not_reproduce_is_refused():
    model = bk.create_diffusion_hyperprior_model(**TINY)
    assert bk.check_exact_unet(model.unet) is None
    model.unet.register_to_config(resnet_time_scale_shift="default")
    with pytest.raises(bk.ExactError, match="no exact integer form"):
        model.update(force=True)

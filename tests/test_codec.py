"""The diffusion-hyperprior codec: model contract, pretrained loading, bitstream, command line."""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bk_sdm_compression as bk
import lic_common
from conftest import ROOT, write_image

TINY = dict(N=16, M=16, diffusion_steps=4, unet_channels=8)


def tiny_model(mode="residual", **kw):
    return bk.create_diffusion_hyperprior_model(**{**TINY, "mode": mode, **kw})


def pretrained_model(path, mode="residual", **kw):
    return bk.create_bk_sdm_compression_model(
        str(path), N=16, diffusion_steps=2, use_pretrained_vae=True, use_pretrained_unet=True, mode=mode, **kw
    )


def ready(model):
    model.eval()
    model.update(force=True)
    return model


def save_ckpt(model, path):
    if model.exact is None:  # what a checkpoint that codes files holds: the exact form
        model.update(force=True)
    lic_common.save_checkpoint(model.checkpoint_payload(), path)
    return path


# ---- forward ----


def perturbed(model, scale=0.05):
    """The model with its U-Net moved off its zero-initialised output, as training moves it."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("mode", bk.MODES)
def test_forward_scratch_keys_and_shapes(mode):
    model = tiny_model(mode, diffusion_steps=4).train()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["y"].shape == (2, 16, 4, 4) and out["z"].shape == (2, 16, 1, 1)
    assert out["prediction"].shape == out["scales"].shape == out["y"].shape
    expected = {"y", "z"} if mode == "residual" else {"z"}
    assert set(out["likelihoods"]) == expected
    # one rate-distortion loss trains the U-Net (its zero-initialised output layer first)
    loss = out["x_hat"].pow(2).mean() - sum(p.log2().sum() for p in out["likelihoods"].values()) * 1e-3
    loss.backward()
    assert model.unet.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", bk.MODES)
def test_forward_pretrained_reads_sizes_from_configs(tiny_bk_sdm, mode):
    model = pretrained_model(tiny_bk_sdm, mode).train()
    # the tiny VAE has 3 latent channels and a factor of 2; the U-Net a cross-attention width of 24
    assert model.config.M == 3
    assert model.latent_factor == 2
    assert model.adapter.proj.out_channels == 24
    # conditioned like SD's inpainting model: input widened to [state, known, mu0, sigma0]
    assert model.unet.conv_in.in_channels == 12 and model.unet.conv_out.out_channels == 6
    x = torch.rand(1, 3, 32, 32)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["y"].shape == (1, 3, 16, 16)
    assert ("y" in out["likelihoods"]) == (mode == "residual")
    # frozen by default: the pretrained weights get no gradient and are not in the checkpoint;
    # the new input and output convolutions are trained and stored
    assert not any(p.requires_grad for n, p in model.unet.named_parameters() if not n.startswith(("conv_in.", "conv_out.")))
    assert model.unet.conv_in.weight.requires_grad and model.unet.conv_out.weight.requires_grad
    assert not any(p.requires_grad for p in model.g_a.vae.parameters())
    state = model.trainable_state_dict()
    assert not any(k.startswith(("unet.", "g_a.vae.")) for k in state if not k.startswith(("unet.conv_in.", "unet.conv_out.")))
    assert {"g_a.log_gain", "adapter.proj.weight", "unet.conv_in.weight", "unet.conv_out.weight"} <= set(state)


def test_pretrained_unet_keeps_its_weights_for_the_latent_channels(tiny_bk_sdm):
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(str(tiny_bk_sdm), subfolder="unet")
    model = pretrained_model(tiny_bk_sdm)
    w = model.unet.conv_in.weight
    assert torch.equal(w[:, :3], original.conv_in.weight) and not w[:, 3:].any()
    assert not model.unet.conv_out.weight.any()


def test_pretrained_finetune_switch_trains_them(tiny_bk_sdm):
    model = pretrained_model(tiny_bk_sdm, finetune_pretrained=True)
    assert all(p.requires_grad for p in model.unet.parameters())
    assert any(k.startswith("unet.down_blocks") for k in model.trainable_state_dict())


def test_missing_bk_sdm_says_so_and_suggests_scratch(tmp_path):
    with pytest.raises(RuntimeError, match="from-scratch"):
        bk.create_bk_sdm_compression_model(str(tmp_path / "nowhere"), use_pretrained_vae=True)


def test_an_uncached_hub_id_fails_at_once_where_the_hub_is_unreachable(monkeypatch):
    """Offline, a hub id not in the local cache is refused after one connection attempt, not after
    huggingface_hub's retries (about half a minute)."""
    reached = []
    monkeypatch.setattr(lic_common, "hub_reachable", lambda timeout=3.0: reached.append(1) or False)
    with pytest.raises(bk.PretrainedError, match="not in the local Hugging Face cache and the hub is not reachable"):
        bk.create_bk_sdm_compression_model("nobody/no-such-model", use_pretrained_vae=True)
    assert reached == [1]


def test_diffusion_steps_zero_is_the_hyper_decoder_alone():
    model = ready(tiny_model(diffusion_steps=0))
    assert model.unet is None
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
        mu0 = model.h_s(model.entropy_bottleneck(out["z"])[0]).chunk(2, 1)[1]
    assert torch.equal(out["prediction"], mu0)


def test_the_chain_starts_at_the_hyperprior_and_the_steps_change_it():
    """The U-Net's output layer starts at zero: an untrained chain predicts what h_s predicts.
    Once it has moved, the steps change the Gaussians, and 0 steps gives h_s's again."""
    model = ready(tiny_model(diffusion_steps=4))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        start = model(x)
        model.set_inference_steps(0)
        hyper = model(x)
        perturbed(model).set_inference_steps(4)
        moved = model(x)
    assert torch.equal(start["prediction"], hyper["prediction"]) and torch.equal(start["scales"], hyper["scales"])
    assert not torch.allclose(moved["prediction"], hyper["prediction"])
    with pytest.raises(ValueError, match="4 or 0"):
        model.set_inference_steps(2)


def test_the_unet_sees_the_timestep_at_full_resolution():
    """Same inputs, another step: the first block's features differ. (With one channel per
    GroupNorm group, as diffusers' 32 groups give at width 32, the timestep embedding it adds
    before the norm is erased there, and the full-resolution block saw every step alike.)"""
    model = perturbed(tiny_model(diffusion_steps=4, unet_channels=16)).eval()
    features = []
    model.unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, i, o: features.append(o))
    y = torch.randn(1, 16, 4, 4)
    known = torch.rand(1, 16, 4, 4) < 0.5
    with torch.no_grad():
        for step in (1, 2):
            model._predict(y, known, torch.tensor([step]), y * 0.5, y.abs() + 1)
    assert not torch.allclose(features[0], features[1], atol=1e-4)


@pytest.mark.parametrize("reveal,steps", [("checkerboard", 4), ("channels", 3)])
def test_reveal_groups_partition_the_latent(reveal, steps):
    model = tiny_model(diffusion_steps=steps, reveal=reveal)
    groups = model.reveal_groups(5, 6, torch.device("cpu"))
    assert groups.shape == (16, 5, 6)
    counts = torch.bincount(groups.flatten())
    assert len(counts) == steps and counts.min() > 0
    if reveal == "checkerboard":  # the anchors ((i + j) even) of a slice come first, then the rest
        i, j = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
        assert torch.equal(groups[0], (i + j) % 2)
        assert torch.equal(groups[-1], 2 + (i + j) % 2)
    else:
        assert all(len(torch.unique(groups[c])) == 1 for c in range(16))


def decoded_chain(model, x):
    """(mu0, sigma0, the decoder's chain run with rounding: (y_hat, means, scales, decoded)) of x."""
    z_hat = model.entropy_bottleneck(model.h_a(model.g_a(x)))[0]
    mu0, sigma0 = model.hyper_decode(z_hat)
    y = model.g_a(x)
    quantize = model.gaussian_conditional.quantize
    return mu0, sigma0, model._run_chain(mu0, sigma0, lambda k, sel, m, s: quantize(y[:, sel], "dequantize", m))


def test_training_inputs_are_the_decoders_inputs():
    """Teacher forcing builds, in one batched pass, the inputs the decoder's chain meets: fed the
    decoded latent in place of the noisy proxy, it gives the chain's Gaussians and denoising."""
    model = ready(perturbed(tiny_model(diffusion_steps=4, latent_denoise=True)))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        mu0, sigma0, (y_hat, means, scales, decoded) = decoded_chain(model, x)
        forced_means, forced_scales, residual, weight = model._teacher_forced(decoded, mu0, sigma0)
    assert weight is None
    torch.testing.assert_close(forced_means, means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forced_scales, scales, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded + residual, y_hat, rtol=1e-5, atol=1e-5)


def test_sampled_teacher_forcing_is_one_pass_per_image_and_an_unbiased_rate():
    """``teacher_forcing = "sampled"``: one U-Net pass per image, on a stratified step; the group
    that step codes gets the chain's Gaussians, and the weighted code length of S copies of an
    image (every step once) is exactly S times the whole chain's."""
    model = ready(perturbed(tiny_model(diffusion_steps=4)))
    x = torch.rand(1, 3, 64, 64).expand(4, 3, 64, 64)
    with torch.no_grad():
        mu0, sigma0, (_, means, scales, decoded) = decoded_chain(model, x)
        y = model.g_a(x)
        batches = []
        model.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
        model.teacher_forcing = "sampled"
        s_means, s_scales, residual, weight = model._teacher_forced(decoded, mu0, sigma0)
        model.teacher_forcing = "all"
        a_means, a_scales, _, _ = model._teacher_forced(decoded, mu0, sigma0)
    assert batches == [4, 16] and residual is None
    groups = model.reveal_groups(*y.shape[-2:], y.device)
    picked = weight > 0
    for b in range(4):  # one group per image, each step once over the batch, weight S
        assert len(torch.unique(groups[picked[b]])) == 1
        assert torch.all(weight[b][picked[b]] == 4)
    assert torch.equal(torch.sort(torch.stack([groups[picked[b]][0] for b in range(4)])).values, torch.arange(4))
    torch.testing.assert_close(s_means[picked], means[picked], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_scales[picked], scales[picked], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_means[~picked], mu0[~picked])
    bits = -model._y_likelihoods(decoded, s_scales, s_means).double().log2()
    whole = -model._y_likelihoods(decoded, a_scales, a_means).double().log2()
    torch.testing.assert_close((weight * bits).sum(), whole.sum(), rtol=1e-6, atol=1e-6)
    model.train()  # and forward's likelihoods carry the weight: bits only where a step coded
    model.teacher_forcing = "sampled"
    out = model(torch.rand(4, 3, 64, 64))
    lik = out["likelihoods"]["y"]
    assert lik.dtype == torch.float64
    coded = (lik < 1).flatten(1).float().mean(1)  # one group of four per image costs bits, at weight 4
    assert torch.all((coded > 0.2) & (coded <= 0.25))


def test_decoder_ste_feeds_the_decoder_the_rounded_latent_with_a_gradient():
    model = perturbed(tiny_model(diffusion_steps=2)).train()
    x = torch.rand(2, 3, 64, 64)
    noisy = model(x)
    offsets = noisy["y_hat"] - noisy["prediction"]
    assert not torch.allclose(offsets, offsets.round(), atol=1e-3)  # the noisy proxy
    model.decoder_ste = True
    out = model(x)
    offsets = out["y_hat"] - out["prediction"]
    torch.testing.assert_close(offsets, offsets.round(), atol=1e-4, rtol=0)  # round(y - means) + means
    out["x_hat"].sum().backward()
    assert model.g_a[0].weight.grad.abs().sum() > 0  # straight through to the encoder


def test_channels_last_computes_the_same_training_forward():
    model = perturbed(tiny_model(diffusion_steps=4)).train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    plain = model(x)
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    nhwc = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc["x_hat"], plain["x_hat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nhwc["likelihoods"]["y"], plain["likelihoods"]["y"], rtol=1e-4, atol=1e-5)


HELP = """
import runpy, sys
for args in (["--help"], ["--no_such_flag"]):
    sys.argv = [{script!r}, *args]
    try:
        runpy.run_path({script!r}, run_name="__main__")
    except SystemExit as e:
        print("exit", e.code, "compressai" in sys.modules)
"""


def test_help_and_argument_errors_answer_before_compressai_loads_and_no_warning_reaches_the_user(tmp_path):
    """--help and a bad flag of every script end before CompressAI (and torch_geometric) is imported;
    a command that loads it (a missing checkpoint here) shows no FutureWarning either."""
    scripts = ("bk_sdm_compression.py", "train_bk_sdm_compression.py", "evaluate_bk_sdm_compression.py",
               "finetune_after_distill.py", "token_compress.py")  # fmt: skip
    image = write_image(tmp_path / "a.png", (16, 16))
    command = [str(ROOT / "bk_sdm_compression.py"), "compress", str(image), str(tmp_path / "a.bksd"), "--checkpoint", str(tmp_path / "no.pth")]
    procs = [subprocess.Popen([sys.executable, "-W", "default", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in [["-c", HELP.format(script=str(ROOT / s))] for s in scripts] + [command]]  # fmt: skip
    for script, proc in zip(scripts, procs):
        out, err = proc.communicate(timeout=120)
        exits = [line for line in out.splitlines() if line.startswith("exit ")]
        assert exits == ["exit 0 False", "exit 2 False"], (script, out[-500:], err[-1000:])
        assert "FutureWarning" not in err and "Traceback" not in err, (script, err[-2000:])
    _, err = procs[-1].communicate(timeout=120)
    assert procs[-1].returncode == 2 and err.startswith("error: ") and "FutureWarning" not in err, err[-2000:]


def test_latent_denoise_changes_only_the_decoded_latent():
    model = ready(perturbed(tiny_model(diffusion_steps=2, latent_denoise=True)))
    plain = ready(perturbed(tiny_model(diffusion_steps=2, latent_denoise=False)))
    plain.load_state_dict(model.state_dict())
    ready(plain)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), plain(x)
        sa, sb = model.compress(x)["strings"], plain.compress(x)["strings"]
    assert sa == sb and torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"])
    assert not torch.equal(a["y_hat"], b["y_hat"])


# ---- entropy coding ----


def close_latents(a, b):
    """The exact chain against the float forward: equal to integer rounding, a rare symbol apart."""
    return (a - b).abs().max() < 0.05 or ((a - b).abs() > 0.05).float().mean() < 0.01


@pytest.mark.parametrize("mode,steps", [("residual", 4), ("residual", 0), ("z_only", 4)])
def test_decompress_reaches_the_encoders_latent(mode, steps):
    model = tiny_model(mode, diffusion_steps=steps)
    if steps:
        perturbed(model)
    ready(model)
    x = torch.rand(2, 3, 33, 47)
    with torch.no_grad():
        out = model(x)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])
    assert enc["shape"] == (33, 47) and dec["x_hat"].shape == x.shape
    assert dec["digests"] == enc["digests"]
    assert close_latents(dec["y_hat"], out["y_hat"])


def test_pretrained_compress_roundtrip(tiny_bk_sdm):
    """BK-SDM's pretrained U-Net codes with its reverse steps, in the exact form, and with 0."""
    model = ready(pretrained_model(tiny_bk_sdm))
    x = torch.rand(1, 3, 30, 34)
    for steps in (model.config.diffusion_steps, 0):
        model.set_inference_steps(steps)
        with torch.no_grad():
            out = model(x)
            enc = model.compress(x)
            dec = model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])
        assert len(enc["strings"]) == 1 + max(1, steps)
        assert dec["digests"] == enc["digests"] and close_latents(dec["y_hat"], out["y_hat"])
        assert dec["x_hat"].shape == x.shape


@pytest.mark.parametrize("steps", [0, 4])
def test_real_bits_agree_with_the_likelihood_estimate(tmp_path, steps):
    """Real bytes within 3% (+ 64 bits per string: CompressAI's rANS flushes a 32-bit state and
    writes whole 32-bit words) of -sum(log2 p) on a latent trained for a few steps: the chain's
    negative log-likelihood is its code length. A coder that wastes bits, or a likelihood that
    lies (a group coded with other Gaussians than the chain's), fails this. (With CompressAI's
    64-level scale table instead of our 256 levels this is about 4% over.)"""
    torch.manual_seed(1)
    model = tiny_model(diffusion_steps=steps, N=32, M=32)
    x = torch.from_numpy(skimage.data.astronaut()[:128, 128:256]).permute(2, 0, 1)[None].float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):  # a few steps so the latent is not all zeros
        out = model(x)
        loss = (out["x_hat"] - x).pow(2).mean() + 0.001 * lic_common.bpp_from_likelihoods(out["likelihoods"], 128 * 128)
        opt.zero_grad()
        loss.backward()
        opt.step()
    aux = torch.optim.Adam([model.entropy_bottleneck.quantiles], lr=1e-2)
    for _ in range(300):  # what the training loop's auxiliary optimizer does along the way
        aux.zero_grad()
        model.aux_loss().backward()
        aux.step()
    ready(model)
    with torch.no_grad():
        out = model(x)
        enc = model.compress(x)
    assert len(enc["strings"]) == max(1, steps) + 1
    for name, strings in (("y", enc["strings"][:-1]), ("z", enc["strings"][-1:])):
        estimate_bits = -torch.log2(out["likelihoods"][name]).sum().item()
        real_bits = sum(8 * len(s[0]) for s in strings)
        assert estimate_bits > 200, name
        assert abs(real_bits - estimate_bits) <= 0.03 * estimate_bits + 64 * len(strings), (name, real_bits, estimate_bits)


def test_fast_gaussian_conditional_gives_compressais_indexes_and_bytes():
    from compressai.entropy_models import GaussianConditional
    from compressai.models.base import get_scale_table

    table = get_scale_table(levels=256)
    ours, ref = bk.FastGaussianConditional(None), GaussianConditional(None)
    for gc in (ours, ref):
        gc.update_scale_table(table)
        gc.update()
    torch.manual_seed(0)
    scales = torch.cat([torch.rand(1, 8, 16, 16) * 3, torch.rand(1, 8, 16, 16) * 300, torch.full((1, 1, 16, 16), 0.05)], 1)
    scales[0, 0, 0, :4] = table[:4]  # exactly on table entries: the rounding direction matters
    y = torch.randn_like(scales) * scales
    means = torch.randn_like(scales)
    idx = ref.build_indexes(scales)
    assert torch.equal(ours.build_indexes(scales), idx)
    strings = ours.compress(y, idx, means=means)
    assert strings == ref.compress(y, idx, means=means)
    assert torch.equal(ours.decompress(strings, idx, means=means), ref.decompress(strings, idx, means=means))


# ---- images of every kind ----


@pytest.mark.parametrize("mode,size,note", [("RGB", (33, 47), None), ("L", (40, 40), None),
                                            ("RGBA", (35, 20), "alpha channel is dropped"), ("I;16", (24, 50), "16 bits per channel")])
def test_image_kinds_roundtrip_through_the_cli(tmp_path, capsys, mode, size, note):
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", size, mode=mode)
    x = lic_common.load_image(src)
    assert x.shape == (3, *size) and 0 <= x.min() and x.max() <= 1
    if mode == "I;16":  # full 16-bit range kept, not clipped at 255
        assert x.max() > 0.5
    grey = mode in ("L", "I;16")
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt), "--effort", "0"])
    err = capsys.readouterr().err
    assert (f"note: {src}: " in err and note in err) if note else "note:" not in err  # what is dropped, named once
    assert bk.read_bitstream((tmp_path / "a.bin").read_bytes())[0].grey == grey
    result = bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(ckpt)])
    assert (result["height"], result["width"]) == size and result["grey"] == grey
    with Image.open(tmp_path / "a.png") as out:  # greyscale comes back greyscale
        assert out.size == (size[1], size[0]) and out.mode == ("L" if grey else "RGB")
    # written atomically, yet with a normal file's mode (not the temporary file's private 0600)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~lic_common._umask()


def test_sixteen_bit_colour_is_named_as_read_at_eight_bits(tmp_path):
    """Pillow reads a 48-bit RGB PNG as 8 bits a channel: the reader says so."""
    rows = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 16, 2, 0, 0, 0))
    (tmp_path / "rgb48.png").write_bytes(png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    x, mode = lic_common.read_image(tmp_path / "rgb48.png")
    assert x.shape == (3, 6, 5) and not mode.grey and any("16 bits per channel" in n for n in mode.notes)
    assert lic_common.read_image(write_image(tmp_path / "rgb.png", (6, 5)))[1] == lic_common.ImageMode()


def test_format_4_files_still_decode(tmp_path):
    """A file of the format before the flags byte decodes as it did."""
    model = tiny_model().eval()
    model.update()
    x = torch.rand(3, 40, 40)
    data = bk.encode_image(model, x)
    body = data[: bk._HEADER.size - 1] + data[bk._HEADER.size : -4]  # no flags byte
    old = body[:4] + bytes([4]) + body[5:]
    old += struct.pack(">I", zlib.crc32(old))
    assert torch.equal(bk.decode_image(model, old), bk.decode_image(model, data))
    assert bk.decode_image(model, bk.encode_image(model, x[:1])).shape == (1, 40, 40)  # greyscale in, greyscale out


def test_decoding_is_deterministic_byte_for_byte(tmp_path):
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", (48, 64))
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt)])
    for name in ("1.png", "2.png"):
        bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / name), "--checkpoint", str(ckpt)])
    assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes()


def test_pretrained_checkpoint_loads_from_the_path_it_names(tmp_path, tiny_bk_sdm):
    model = pretrained_model(tiny_bk_sdm)
    ckpt = save_ckpt(model, tmp_path / "codec.pth")
    loaded, _ = bk.load_codec(ckpt)
    assert loaded.fingerprint() == model.fingerprint()
    src = write_image(tmp_path / "in.png", (32, 32))
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt)])  # with its steps
    assert bk.read_bitstream((tmp_path / "a.bin").read_bytes())[0].diffusion_steps == model.config.diffusion_steps
    bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(ckpt)])
    assert (tmp_path / "a.png").exists()


def test_slim_checkpoint_is_smaller_and_codes_like_the_full_one(tmp_path):
    """The shipped form: no entropy tables (load_codec derives them), fp16 where fp16 is exact
    enough, GDN's tiny reparametrised values kept in fp32; it decodes what it encodes."""
    model = tiny_model()
    with torch.no_grad():
        model.g_a[1].beta.fill_(1e-6)  # below fp16's normal range: must stay fp32
    ready(model)
    full = save_ckpt(model, tmp_path / "full.pth")
    lic_common.save_checkpoint(model.checkpoint_payload() | {"state_dict": model.state_dict()}, full)  # with tables
    slim = bk.slim_checkpoint(lic_common.load_checkpoint(full))
    lic_common.save_checkpoint(slim, tmp_path / "slim.pth")
    assert not any(k.endswith(bk.ENTROPY_TABLES) for k in slim["state_dict"])
    assert slim["state_dict"]["g_s.0.weight"].dtype == torch.float16
    assert slim["state_dict"]["g_a.1.beta"].dtype == torch.float32
    assert (tmp_path / "slim.pth").stat().st_size < 0.6 * full.stat().st_size

    a, _ = bk.load_codec(full)
    b, _ = bk.load_codec(tmp_path / "slim.pth")
    assert torch.equal(b.gaussian_conditional.scale_table, a.gaussian_conditional.scale_table)
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        enc = b.compress(x)
        assert b.decompress(enc["strings"], enc["shape"], digests=enc["digests"])["digests"] == enc["digests"]
        assert lic_common.psnr(a(x)["x_hat"], b(x)["x_hat"]) > 40  # fp16 rounding changes almost nothing


# ---- bad files ----


@pytest.fixture
def coded(tmp_path):
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", (40, 40))
    bk.main(["compress", str(src), str(tmp_path / "good.bin"), "--checkpoint", str(ckpt)])
    return ckpt, (tmp_path / "good.bin").read_bytes()


def _decode_fails(tmp_path, ckpt, data, match, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    with pytest.raises(SystemExit) as exc:
        bk.main(["decompress", str(bad), str(tmp_path / "out.png"), "--checkpoint", str(ckpt)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err, err
    assert not (tmp_path / "out.png").exists()


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_bad_files_get_clear_errors(tmp_path, coded, capsys):
    ckpt, good = coded
    _decode_fails(tmp_path, ckpt, b"", "empty", capsys)
    _decode_fails(tmp_path, ckpt, good[: len(good) // 2], "truncated or corrupted", capsys)
    _decode_fails(tmp_path, ckpt, good[:10], "truncated", capsys)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    _decode_fails(tmp_path, ckpt, bytes(flipped), "corrupted", capsys)
    _decode_fails(tmp_path, ckpt, b"\x89PNG\r\n\x1a\n" + good[8:], "not a bk_sdm_compression file", capsys)
    # a well-formed header that asks for 100000 x 100000 pixels
    body = bytearray(good[:-4])
    body[14:22] = (100_000).to_bytes(4, "big") * 2
    _decode_fails(tmp_path, ckpt, _with_crc(bytes(body)), "limit", capsys)
    body = bytearray(good[:-4])
    body[14:18] = (0).to_bytes(4, "big")
    _decode_fails(tmp_path, ckpt, _with_crc(bytes(body)), "limit", capsys)


def test_file_from_another_checkpoint_is_refused(tmp_path, coded, capsys):
    _, good = coded
    other = save_ckpt(tiny_model(), tmp_path / "other.pth")  # same config, other weights
    _decode_fails(tmp_path, other, good, "another checkpoint", capsys)


def test_wrong_checkpoint_and_corrupt_image_are_clear(tmp_path, capsys):
    lic_common.save_checkpoint({"state_dict": {}}, tmp_path / "foreign.pth")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    for argv, match in (
        (["compress", str(write_image(tmp_path / "a.png")), str(tmp_path / "x.bin"), "--checkpoint", str(tmp_path / "foreign.pth")], "expected"),
        (["compress", str(tmp_path / "broken.png"), str(tmp_path / "x.bin"), "--checkpoint", str(ckpt)], "cannot decode image"),
        (["compress", str(tmp_path / "a.png"), str(tmp_path / "x.bin"), "--checkpoint", str(tmp_path / "none.pth")], "not found"),
    ):
        with pytest.raises(SystemExit):
            bk.main(argv)
        assert match in capsys.readouterr().err


def test_header_records_mode_size_and_steps(coded):
    _, good = coded
    header, strings = bk.read_bitstream(good)
    assert (header.mode, header.height, header.width, header.diffusion_steps) == ("residual", 40, 40, 4)
    assert len(strings) == 5 and len(good) == 4 + 1 + 1 + 8 + 4 + 4 + 2 + 1 + 8 + 2 + 4 + 1 + sum(4 + len(s) for s in strings) + 4
    assert header.quality_code is None and len(header.z_digest) == 4  # fixed rate; the hyper-latent's digest


def test_step_count_is_recorded_and_a_mismatch_refused(tmp_path, capsys):
    """A file says how many reverse steps coded it; the decoder follows it by default and
    refuses to decode it with another count (the count decides which group each string holds)."""
    ckpt = save_ckpt(perturbed(tiny_model(diffusion_steps=4)), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", (48, 48))
    bk.main(["compress", str(src), str(tmp_path / "zero.bin"), "--checkpoint", str(ckpt), "--diffusion_steps", "0"])
    assert bk.read_bitstream((tmp_path / "zero.bin").read_bytes())[0].diffusion_steps == 0
    bk.main(["decompress", str(tmp_path / "zero.bin"), str(tmp_path / "zero.png"), "--checkpoint", str(ckpt)])
    zero_steps, _ = bk.load_codec(ckpt, diffusion_steps=0)
    with torch.no_grad():
        expected = zero_steps(lic_common.load_image(src)[None])["x_hat"][0]  # the float forward: a few 1e-4 apart
    assert lic_common.psnr(lic_common.load_image(tmp_path / "zero.png"), lic_common.to_uint8(expected).float() / 255) > 40

    bk.main(["compress", str(src), str(tmp_path / "four.bin"), "--checkpoint", str(ckpt)])
    for name, steps in (("four.bin", "0"), ("zero.bin", "4")):
        with pytest.raises(SystemExit) as exc:
            bk.main(["decompress", str(tmp_path / name), str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--diffusion_steps", steps])
        assert exc.value.code == 2 and "diffusion steps" in capsys.readouterr().err
    model, _ = bk.load_codec(ckpt, diffusion_steps=0)
    with pytest.raises(bk.BitstreamError, match="coded with 4 diffusion steps"):
        bk.decode_image(model, (tmp_path / "four.bin").read_bytes())
    with pytest.raises(SystemExit) as exc:  # a count the checkpoint has no groups for
        bk.main(["compress", str(src), str(tmp_path / "x.bin"), "--checkpoint", str(ckpt), "--diffusion_steps", "3"])
    assert exc.value.code == 2 and "4 or 0" in capsys.readouterr().err


def test_old_format_checkpoint_gets_a_clear_error(tmp_path):
    old = {"architecture": bk.ARCHITECTURE, "state_dict": {},
           "config": {"N": 16, "M": 16, "diffusion_steps": 2, "noise_schedule": "linear", "beta_start": 1e-4}}  # fmt: skip
    lic_common.save_checkpoint(old, tmp_path / "old.pth")
    with pytest.raises(lic_common.CheckpointError, match="format 1.*Retrain"):
        bk.load_codec(tmp_path / "old.pth")


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="even"):
        bk.CodecConfig(diffusion_steps=3, reveal="checkerboard")
    with pytest.raises(ValueError, match="channel slices"):
        tiny_model(diffusion_steps=40, reveal="channels")


def test_shipped_reference_checkpoints_load_code_and_order_by_rate():
    """reference_checkpoints/: every file loads, codes a photograph to a real bitstream and back,
    and the rate falls as lambda_rate grows (the files are the curve the README reports)."""
    paths = sorted((ROOT / "reference_checkpoints").glob("diffusion-hyperprior-lambda*.pth"), key=lambda p: float(p.stem.split("lambda")[1]))
    assert len(paths) >= 4
    x = torch.from_numpy(skimage.data.astronaut()[96:224, 160:288].copy()).permute(2, 0, 1)[None].float() / 255
    sizes = []
    for path in paths:
        model, _ = bk.load_codec(path)
        with torch.no_grad():
            coded = model.compress(x)
            x_hat = model.decompress(coded["strings"], coded["shape"], digests=coded["digests"])["x_hat"].clamp(0, 1)
        sizes.append(sum(len(s) for group in coded["strings"] for s in group))
        psnr = -10 * torch.log10((x_hat - x).pow(2).mean()).item()
        assert psnr > 24, (path.name, psnr)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


def test_a_header_rewritten_to_another_size_is_refused_before_the_latent_is_decoded(tmp_path, coded, capsys, monkeypatch):
    """A valid CRC over a header that asks for 2048x2048: the hyper-latent's checksum stops the
    decoder before the reverse chain (which would allocate the whole latent) runs."""
    ckpt, data = coded
    header, strings = bk.read_bitstream(data)
    header.height = header.width = 2048
    chain = []
    monkeypatch.setattr(bk.DiffusionHyperprior, "_exact_chain", lambda *a, **k: chain.append(1))
    _decode_fails(tmp_path, ckpt, bk.write_bitstream(header, strings), "hyper-latent checksum mismatch", capsys)
    assert not chain and not (tmp_path / "out.png").exists()


# ---- many images, any size ----


def test_several_images_in_one_call_make_the_same_files_and_a_bad_one_is_named(tmp_path, capsys):
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    images = [write_image(tmp_path / "in" / f"{n}.png", (40 + 8 * i, 48), seed=i) for i, n in enumerate("abc")]
    grey = write_image(tmp_path / "in" / "g.png", (40, 40), mode="L")
    for p in images[:2]:  # one call per image: the reference
        bk.main(["compress", str(p), str(tmp_path / f"{p.stem}.bksd"), "--checkpoint", str(ckpt)])
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        bk.main(["compress", *map(str, [images[0], bad, *images[1:], grey]), "--output_dir", str(tmp_path / "out"),
                 "--checkpoint", str(ckpt), "--no-progress"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: cannot decode image" in err and "1 of 5 inputs could not be coded" in err
    for p in images[:2]:  # the others still coded, byte for byte as alone
        assert (tmp_path / "out" / f"{p.stem}.bksd").read_bytes() == (tmp_path / f"{p.stem}.bksd").read_bytes()
    files = sorted((tmp_path / "out").glob("*.bksd"))
    assert [f.stem for f in files] == ["a", "b", "c", "g"]
    result = bk.main(["decompress", *map(str, files), "--output_dir", str(tmp_path / "dec"), "--checkpoint", str(ckpt)])
    assert [r["grey"] for r in result["files"]] == [False, False, False, True]
    for p in [*images, grey]:
        with Image.open(tmp_path / "dec" / f"{p.stem}.png") as out, Image.open(p) as src:
            assert out.size == src.size and out.mode == src.mode
    with pytest.raises(SystemExit):  # without --output_dir: IN OUT only
        bk.parse_args(["compress", *map(str, images), "--checkpoint", str(ckpt)])
    with pytest.raises(SystemExit):  # two inputs that would write one file
        bk.parse_args(["compress", str(images[0]), str(tmp_path / "x" / "a.png"), "--output_dir", "o", "--checkpoint", "c"])


def test_tiled_analysis_and_synthesis_are_the_whole_ones():
    """Tiles with a halo of the receptive field: the latent and the picture of the untiled
    transforms up to float rounding, and the same file."""
    model = tiny_model().eval()
    model.update(force=True)
    assert (model.halo_a, model.halo_s) == (32, 2)  # four 5x5 stride-2 layers: 30 pixels (on the 16-pixel grid); 2 latent positions
    x, latent = torch.rand(1, 3, 150, 230), torch.randn(1, 16, 10, 15)
    with torch.no_grad():
        model.tile = 0
        y, picture, whole = model.analyze(x), model.synthesize(latent, 160, 240), bk.encode_image(model, x[0])
        model.tile = 64  # 3 x 4 tiles of the picture, 3 x 4 of the latent
        calls = []
        hooks = [t.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[-2:]))) for t in (model.g_a, model.g_s)]
        assert (model.analyze(x) - y).abs().max() < 1e-5
        assert (model.synthesize(latent, 160, 240) - picture).abs().max() < 1e-5
        for hook in hooks:
            hook.remove()
        assert len(calls) == 24 and max(calls) <= (64 + 2 * 32, 64 + 2 * 32)  # tiles, each with its halo, never the whole
        assert bk.encode_image(model, x[0]) == whole
        model.halo_s = 1  # the halo is exact: one latent position less and the tiles show seams
        assert (model.synthesize(latent, 160, 240) - picture).abs().max() > 1e-2
    assert bk.receptive_halo(model.unet) is None  # GroupNorm sees everything: never tiled


def test_exact_convolutions_in_blocks_of_rows_are_the_whole_ones(monkeypatch):
    torch.manual_seed(0)
    layers = [nn.Conv2d(64, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 5, 1, 2),
              nn.ConvTranspose2d(8, 6, 5, 2, 2, 1), nn.Conv2d(16, 4, 5, 2, 2)]  # fmt: skip
    for layer in layers:
        x = torch.randint(-1000, 1000, (2, layer.in_channels, 23, 17))
        w = torch.randint(-100, 100, layer.weight.shape).float()
        if isinstance(layer, nn.ConvTranspose2d):
            ref = F.conv_transpose2d(x.double(), w.double(), None, layer.stride, layer.padding, layer.output_padding)
        else:
            ref = F.conv2d(x.double(), w.double(), None, layer.stride, layer.padding)
        for chunk in (2**23, 500, 1):  # whole, a few rows, one row at a time
            monkeypatch.setattr(bk, "CONV_CHUNK", chunk)
            blocks = []
            monkeypatch.setattr(bk, "_conv_rows", lambda x, *a, f=bk._conv_rows: blocks.append(x.shape[2]) or f(x, *a))
            out = bk._integer_conv(x, w, layer)
            monkeypatch.undo()
            assert out.dtype == torch.long and torch.equal(out, ref.long()), (layer, chunk)
            if chunk == 1 and not isinstance(layer, nn.ConvTranspose2d):  # one output row a block
                assert len(blocks) == ref.shape[2], (layer, blocks)

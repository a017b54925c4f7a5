"""The diffusion-hyperprior codec: model contract, pretrained loading, bitstream, command line."""

import zlib

import pytest
import skimage.data
import torch
from PIL import Image

import bk_sdm_compression as bk
import lic_common
from conftest import write_image

TINY = dict(N=16, M=16, diffusion_steps=3, unet_channels=8)


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
    lic_common.save_checkpoint(model.checkpoint_payload(), path)
    return path


# ---- forward ----


@pytest.mark.parametrize("mode", bk.MODES)
def test_forward_scratch_keys_and_shapes(mode):
    model = tiny_model(mode).train()
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["y"].shape == (2, 16, 4, 4) and out["z"].shape == (2, 16, 1, 1)
    assert out["prediction"].shape == out["y"].shape
    expected = {"y", "z"} if mode == "residual" else {"z"}
    assert set(out["likelihoods"]) == expected
    assert out["denoising_loss"].item() > 0
    loss = out["x_hat"].pow(2).mean() + out["denoising_loss"]
    loss.backward()
    assert model.unet.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", bk.MODES)
def test_forward_pretrained_reads_sizes_from_configs(tiny_bk_sdm, mode):
    model = pretrained_model(tiny_bk_sdm, mode).train()
    # the tiny VAE has 3 latent channels and a factor of 2; the U-Net a cross-attention width of 24
    assert model.config.M == 3
    assert model.latent_factor == 2
    assert model.adapter.proj.out_channels == 24
    x = torch.rand(1, 3, 32, 32)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["y"].shape == (1, 3, 16, 16)
    assert ("y" in out["likelihoods"]) == (mode == "residual")
    # frozen by default: the pretrained weights get no gradient and are not in the checkpoint
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.g_a.vae.parameters())
    state = model.trainable_state_dict()
    assert not any(k.startswith(("unet.", "g_a.vae.")) for k in state)
    assert "g_a.log_gain" in state and "adapter.proj.weight" in state


def test_pretrained_finetune_switch_trains_them(tiny_bk_sdm):
    model = pretrained_model(tiny_bk_sdm, finetune_pretrained=True)
    assert all(p.requires_grad for p in model.unet.parameters())
    assert any(k.startswith("unet.") for k in model.trainable_state_dict())


def test_missing_bk_sdm_says_so_and_suggests_scratch(tmp_path):
    with pytest.raises(RuntimeError, match="from-scratch"):
        bk.create_bk_sdm_compression_model(str(tmp_path / "nowhere"), use_pretrained_vae=True)


def test_diffusion_steps_zero_is_the_hyper_decoder_alone():
    model = ready(tiny_model(diffusion_steps=0))
    assert model.unet is None
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
        mu0 = model.h_s(model.entropy_bottleneck(out["z"])[0]).chunk(2, 1)[1]
    assert torch.equal(out["prediction"], mu0)


def test_diffusion_changes_the_prediction_and_schedules_come_from_diffusers():
    model = ready(tiny_model(noise_schedule="cosine"))
    assert model.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert model.scheduler.config.num_train_timesteps == 3
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        with_diffusion = model(x)["prediction"]
        model.set_inference_steps(0)
        without = model(x)["prediction"]
    assert not torch.allclose(with_diffusion, without)


def test_denoising_loss_trains_the_unet_and_nothing_else():
    """The auxiliary DDPM loss must not reach the entropy model (h_s, h_a, g_a), whose scales and
    means the rate-distortion loss alone shapes; the RD loss does reach the U-Net."""
    model = tiny_model().train()
    out = model(torch.rand(2, 3, 64, 64))
    out["denoising_loss"].backward(retain_graph=True)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("unet."))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if not n.startswith("unet."))
    model.zero_grad()
    out["likelihoods"]["y"].log().sum().neg().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("unet."))


# ---- entropy coding ----


@pytest.mark.parametrize("mode", bk.MODES)
def test_decompress_gives_exactly_the_forward_latent(mode):
    model = ready(tiny_model(mode))
    x = torch.rand(2, 3, 33, 47)
    with torch.no_grad():
        out = model(x)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    assert enc["shape"] == (33, 47)
    assert torch.equal(dec["y_hat"], out["y_hat"])
    assert torch.equal(dec["x_hat"], out["x_hat"].clamp(0, 1))


def test_pretrained_compress_roundtrip(tiny_bk_sdm):
    model = ready(pretrained_model(tiny_bk_sdm))
    x = torch.rand(1, 3, 30, 34)
    with torch.no_grad():
        out = model(x)
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    assert torch.equal(dec["y_hat"], out["y_hat"])
    assert dec["x_hat"].shape == x.shape


def test_real_bits_agree_with_the_likelihood_estimate(tmp_path):
    """Real bytes within 3% (+ 64 bits per string: CompressAI's rANS flushes a 32-bit state and
    writes whole 32-bit words) of -sum(log2 p) on a
    latent trained for a few steps; a coder that wastes bits or a likelihood that lies fails this.
    (With CompressAI's 64-level scale table instead of our 256 levels this is about 4% over.)"""
    torch.manual_seed(1)
    model = tiny_model(diffusion_steps=0, N=32, M=32)
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
    for name, strings in zip(("y", "z"), enc["strings"]):
        estimate_bits = -torch.log2(out["likelihoods"][name]).sum().item()
        real_bits = 8 * len(strings[0])
        assert estimate_bits > 200, name
        assert abs(real_bits - estimate_bits) <= 0.03 * estimate_bits + 64, (name, real_bits, estimate_bits)


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


@pytest.mark.parametrize("mode,size", [("RGB", (33, 47)), ("L", (40, 40)), ("RGBA", (35, 20)), ("I;16", (24, 50))])
def test_image_kinds_roundtrip_through_the_cli(tmp_path, mode, size):
    ckpt = save_ckpt(tiny_model(), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", size, mode=mode)
    x = lic_common.load_image(src)
    assert x.shape == (3, *size) and 0 <= x.min() and x.max() <= 1
    if mode == "I;16":  # full 16-bit range kept, not clipped at 255
        assert x.max() > 0.5
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt)])
    result = bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(ckpt)])
    assert (result["height"], result["width"]) == size
    with Image.open(tmp_path / "a.png") as out:
        assert out.size == (size[1], size[0]) and out.mode == "RGB"


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
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt)])
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
        assert torch.equal(b.decompress(enc["strings"], enc["shape"])["y_hat"], b(x)["y_hat"])
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
    assert (header.mode, header.height, header.width, header.diffusion_steps) == ("residual", 40, 40, 3)
    assert len(strings) == 2 and len(good) == 4 + 1 + 1 + 8 + 4 + 4 + 2 + 1 + sum(4 + len(s) for s in strings) + 4


def test_step_override_is_recorded_and_used_by_the_decoder(tmp_path):
    model = tiny_model(diffusion_steps=3)
    ckpt = save_ckpt(model, tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", (48, 48))
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt), "--diffusion_steps", "1"])
    assert bk.read_bitstream((tmp_path / "a.bin").read_bytes())[0].diffusion_steps == 1
    bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(ckpt)])
    one_step, _ = bk.load_codec(ckpt, diffusion_steps=1)
    with torch.no_grad():
        expected = one_step(lic_common.load_image(src)[None])["x_hat"][0]
    assert torch.equal(lic_common.load_image(tmp_path / "a.png"), lic_common.to_uint8(expected).float() / 255)

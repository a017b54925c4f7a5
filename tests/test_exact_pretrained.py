"""BK-SDM's pretrained U-Net (diffusers' ``UNet2DConditionModel``) in the exact integer form: the
integer walk is diffusers' forward, and a codec trained with it writes files with its reverse steps
that decode to the same latent in every process configuration."""

import math

import pytest
import torch
import torch.nn.functional as F

import bk_sdm_compression as bk
import evaluate_bk_sdm_compression as ev
import lic_common
import train_bk_sdm_compression as tr
from conftest import make_bk_sdm, write_image
from test_exact import check_files_cross_cpu_and_cuda, check_files_cross_process_configurations, move_means_by_one_unit

# U-Net layouts beside conftest's (convolutional projections, 4 heads 4 wide, cross-attention 24 wide,
# no mid block, as BK-SDM-Small): Stable Diffusion 2.x's linear projections with per-block head
# counts and a cross-attention mid block; two resnets and two transformer layers per block.
SHAPES = {
    "sd2-linear": dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 8),
                       cross_attention_dim=20, use_linear_projection=True, upcast_attention=True,
                       mid_block_type="UNetMidBlock2DCrossAttn"),
    "deeper": dict(layers_per_block=2, transformer_layers_per_block=2, attention_head_dim=2, cross_attention_dim=12,
                   mid_block_type="UNetMidBlock2DCrossAttn"),
}  # fmt: skip


@pytest.fixture(scope="module", params=["bk-sdm-small", *SHAPES])
def folder(request, tiny_bk_sdm, tmp_path_factory):
    if request.param == "bk-sdm-small":
        return tiny_bk_sdm
    return make_bk_sdm(tmp_path_factory.mktemp(request.param), **SHAPES[request.param])


def codec(folder, **kw):
    """A pretrained-path codec whose new layers (and the rest) are off their initialisation."""
    model = bk.create_bk_sdm_compression_model(str(folder), N=16, diffusion_steps=2, use_pretrained_vae=True,
                                               use_pretrained_unet=True, **kw)  # fmt: skip
    torch.manual_seed(3)
    with torch.no_grad():
        for p in [*model.unet.parameters(), *model.h_s.parameters(), *model.adapter.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def exact_codec(folder, **kw):
    model = codec(folder, **kw)
    model.calibrate([torch.rand(3, 64, 64) for _ in range(2)])
    model.update(force=True)
    return model


# ---- the integer network's pieces ----


def test_gelu_and_exp_tables_are_correctly_rounded():
    gelu, exp = bk._gelu_table(), bk._exp_table()
    for i in range(0, len(gelu), 97):
        x = i / 2**bk.GELU_STEP_BITS - bk.GELU_RANGE
        assert abs(int(gelu[i]) - x * (1 + math.erf(x / math.sqrt(2))) / 2 * 2**bk.LOG_BITS) <= 0.5 + 1e-6
    for i in range(0, len(exp), 997):
        assert abs(int(exp[i]) - math.exp(-i / 2**bk.EXP_STEP_BITS) * 2**bk.EXP_BITS) <= 0.5 + 1e-6


def test_transposed_convolutions_are_exact_and_bounded_by_their_overlaps():
    layer = torch.nn.ConvTranspose2d(6, 4, 5, stride=2, padding=2, output_padding=1)
    assert bk._sum_terms(layer) == 6 * 3 * 3  # ceil(5 / 2)**2 taps per output, not 5**2 / 2**2
    x = torch.randint(-(2**19), 2**19, (2, 6, 5, 7)).double()
    w = torch.randint(-(2**15), 2**15, (6, 4, 5, 5)).double()
    assert torch.equal(bk._integer_conv(x, w, layer), F.conv_transpose2d(x, w, None, 2, 2, 1))
    for conv in (torch.nn.Conv2d(6, 4, 3, stride=2, padding=1), torch.nn.Conv2d(6, 4, 1)):
        w = torch.randint(-(2**15), 2**15, conv.weight.shape).double()
        assert torch.equal(bk._integer_conv(x, w, conv), F.conv2d(x, w, None, conv.stride, conv.padding))


def test_integer_attention_is_softmax_attention_and_chunks_change_nothing(monkeypatch):
    """Against float64 attention on the values the integers stand for; and a chunk of 5 queries
    gives the very integers of one chunk."""
    attn = SimpleAttention(heads=2, scale=0.25)
    ex = FakeExact({"a": {"scale": round(0.25 * 2**bk.SCALE_BITS), "f_out": 12}})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randint(-(2**14), 2**14, (2, n, 8), generator=g) for n in (13, 11, 11))
    ops = bk._IntOps(ex)
    out, f = ops.attention("a", (q, 12), (k, 12), (v, 12), attn)
    qf, kf, vf = (t.double() / 2**12 for t in (q, k, v))
    ref = bk._FloatOps().attention("a", qf, kf, vf, attn)
    assert f == 12 and (out.double() / 2**12 - ref).abs().max() < 1e-3
    monkeypatch.setattr(bk, "ATTENTION_CHUNK", 2 * 2 * 11 * 5)
    assert torch.equal(ops.attention("a", (q, 12), (k, 12), (v, 12), attn)[0], out)


class SimpleAttention:
    def __init__(self, heads, scale):
        self.heads, self.scale = heads, scale


class FakeExact:
    def __init__(self, attention):
        self.attention, self.exp_table = attention, bk._exp_table()


# ---- the walk is the model ----


def test_the_integer_walk_is_diffusers_forward(folder):
    """The op sequence the integer form follows, run in float64, is diffusers' UNet2DConditionModel
    (and the adapter) for each layout."""
    model = codec(folder)
    M = model.config.M
    x, cond = torch.randn(2, 4 * M, 8, 12), torch.randn(2, 2 * M, 8, 12)
    t = model.step_timesteps[torch.tensor([0, 2])]
    ops = bk._FloatOps(bk.unet_time_tables(model.unet, t))
    context = bk._walk_adapter(ops, model.adapter, cond.double())
    with torch.no_grad():
        tokens = model.adapter(cond)
        reference = model.unet(x, t, encoder_hidden_states=tokens).sample
    assert torch.allclose(context.float(), tokens, atol=1e-5)
    walked = bk._walk_unet(ops, model.unet, x.double(), context).float()
    assert reference.abs().max() > 0.1 and torch.allclose(walked, reference, atol=1e-4)


# ---- coding ----


def test_the_pretrained_path_codes_with_its_steps_each_image_as_alone(folder, monkeypatch):
    model = exact_codec(folder)
    assert model.exact.has_unet and model.exact.attention
    x = torch.rand(2, 3, 48, 64)
    enc = model.compress(x)
    assert len(enc["strings"]) == 1 + model.config.diffusion_steps
    dec = model.decompress(enc["strings"], enc["shape"], z_digests=enc["z_digests"], digests=enc["digests"])
    assert dec["digests"] == enc["digests"] and dec["x_hat"].shape == x.shape
    with torch.no_grad():
        y_float = model(x)["y_hat"]
    assert ((dec["y_hat"] - y_float).abs() > 0.05).float().mean() < 0.01  # a rare symbol rounds the other way
    alone = model.compress(x[1:])
    assert alone["digests"][0] == enc["digests"][1] and [s[0] for s in alone["strings"]] == [s[1] for s in enc["strings"]]
    monkeypatch.setattr(bk, "ATTENTION_CHUNK", 2**16)  # tens of chunks of queries: the same integers
    assert model.compress(x[1:])["strings"] == alone["strings"]


def test_python_decompress_refuses_a_latent_other_than_the_encoders(tiny_bk_sdm, monkeypatch):
    model = exact_codec(tiny_bk_sdm)
    enc = model.compress(torch.rand(1, 3, 64, 64))
    move_means_by_one_unit(monkeypatch)
    with pytest.raises(bk.BitstreamError, match="latent checksum mismatch"):
        model.decompress(enc["strings"], enc["shape"], digests=enc["digests"])
    with pytest.warns(UserWarning, match="cannot check"):  # without the digests it says it checks nothing
        model.decompress(enc["strings"], enc["shape"])


def test_what_the_walk_does_not_reproduce_is_refused_by_name(tiny_bk_sdm):
    model = codec(tiny_bk_sdm)
    model.unet.register_to_config(mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(bk.ExactError, match="mid block UNetMidBlock2DSimpleCrossAttn"):
        model.update(force=True)


# ---- trained by the training script: files, processes, evaluation ----


@pytest.fixture(scope="module")
def trained(tiny_bk_sdm, tmp_path_factory):
    """A codec trained by train_bk_sdm_compression.py with BK-SDM's VAE and U-Net (one epoch)."""
    root = tmp_path_factory.mktemp("pretrained-run")
    for i in range(4):
        write_image(root / "data" / f"t{i}.png", (72, 80), seed=i)
    tr.main(["--data_path", str(root / "data"), "--output_dir", str(root / "run"), "--use_pretrained_vae",
             "--use_pretrained_unet", "--bk_sdm_path", str(tiny_bk_sdm), "--N", "8", "--diffusion_steps", "2",
             "--image_size", "64", "--val_image_size", "64", "--batch_size", "2", "--num_workers", "0",
             "--warmup_steps", "2", "--no-progress", "--epochs", "1", "--calibration_crops", "2"])  # fmt: skip
    return root / "run" / "best_checkpoint.pth"


def test_a_trained_checkpoint_codes_files_with_its_steps_in_every_process_configuration(trained, tmp_path):
    ckpt = lic_common.load_checkpoint(trained)
    assert ckpt["exact"]["prior"]["attention"] and ckpt["exact"]["prior"]["conv_time"]  # the U-Net's exact form is stored
    data = check_files_cross_process_configurations(trained, tmp_path)
    assert bk.read_bitstream(data)[0].diffusion_steps == 2


def test_the_evaluation_reports_real_bytes_coded_with_the_steps(trained, tmp_path):
    data = tmp_path / "eval"
    write_image(data / "a.png", (48, 64), seed=1)
    summary = ev.main(["--model_path", str(trained), "--data_path", str(data), "--output_dir", str(tmp_path / "ev")])
    model, _ = bk.load_codec(trained)
    file = bk.encode_image(model, lic_common.load_image(data / "a.png"))
    assert bk.read_bitstream(file)[0].diffusion_steps == 2 and summary["roundtrip_mismatches"] <= 1
    bpp = next(iter(ev_bpps(tmp_path / "ev")))
    assert bpp == pytest.approx(8 * len(file) / (48 * 64))


def ev_bpps(out):
    import json

    for f in out.glob("*.json"):
        d = json.loads(f.read_text())
        if isinstance(d, dict) and "results" in d and "bpp" in d["results"]:
            yield d["results"]["bpp"][0]


def test_a_checkpoint_from_before_the_unets_integer_form_is_told_to_convert_and_converts(trained, tmp_path):
    ckpt = lic_common.load_checkpoint(trained)
    prior = ckpt["exact"]["prior"]
    names = [n for n in prior["exponents"] if n.startswith("hs.")]  # what update() stored when only h_s was exact
    ckpt["exact"]["prior"] = {"exponents": {n: prior["exponents"][n] for n in names}, "norms": {}, "thresholds": prior["thresholds"]}
    lic_common.save_checkpoint(ckpt, tmp_path / "old.pth")
    old, _ = bk.load_codec(tmp_path / "old.pth")
    x = torch.rand(3, 48, 64)
    with pytest.raises(bk.ExactError, match="convert"):
        bk.encode_image(old, x)
    images = tmp_path / "train"
    for i in range(2):
        write_image(images / f"t{i}.png", (64, 64), seed=i)
    bk.main(["convert", str(tmp_path / "old.pth"), str(tmp_path / "new.pth"), "--data", str(images), "--crops", "2", "--crop_size", "64"])
    new, _ = bk.load_codec(tmp_path / "new.pth")
    data = bk.encode_image(new, x)
    assert bk.read_bitstream(data)[0].diffusion_steps == 2 and bk.decode_image(new, data).shape == x.shape


def test_the_exact_path_reads_and_sets_no_backend_flag(tiny_bk_sdm, monkeypatch):
    """Nothing process-wide decides a value: coding works with cuDNN's and oneDNN's flag switches
    made to fail, so no other thread can change the exact path's arithmetic by flipping them."""
    model = exact_codec(tiny_bk_sdm)
    x = torch.rand(1, 3, 48, 64)
    expected = model.compress(x)["strings"]

    def refuse(*args, **kwargs):
        raise AssertionError("the exact path touched a backend flag")

    monkeypatch.setattr(torch.backends.cudnn, "flags", refuse)
    monkeypatch.setattr(torch.backends.mkldnn, "flags", refuse)
    assert model.compress(x)["strings"] == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrained_files_cross_between_cpu_and_cuda_with_tf32_on_and_off(trained, tmp_path):
    check_files_cross_cpu_and_cuda(trained, tmp_path)

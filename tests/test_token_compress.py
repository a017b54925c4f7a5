"""Vision token compression (token_compress.py) with a tiny CLIP saved to a folder."""

import pytest
import torch
import torch.nn as nn

import lic_common
import token_compress as tc
from conftest import write_image


def test_tiny_clip_loads_through_from_pretrained_and_drops_the_class_token(tiny_clip):
    clip, processor = tc.load_clip(str(tiny_clip), torch.device("cpu"))
    assert tc.clip_grid_size(clip) == 24
    pixels = torch.randn(2, 3, 48, 48)
    tokens = tc.clip_tokens(clip, pixels, layer=-2)
    assert tokens.shape == (2, 32, 24, 24)
    hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == 24 * 24 + 1  # class token + grid
    assert torch.allclose(tokens[0, :, 0, 0], hidden[0, 1]) and torch.allclose(tokens[0, :, 0, 1], hidden[0, 2])


@pytest.mark.parametrize("g", [4, 6, 8, 12])
@pytest.mark.parametrize("attention", [False, True])
def test_compressor_and_decoder_shapes(g, attention):
    config = {"output_grid_size": g, "num_layers": 3, "hidden_dim": 16, "use_residual": True, "use_attention": attention,
              "attention_heads": 4, "critic_hidden": 8, "multiscale_critic": False, "clip_model": "x", "select_layer": -2}  # fmt: skip
    model = tc.TokenCompressor(32, 24, config)
    compressed, recon = model(torch.randn(2, 32, 24, 24))
    assert compressed.shape == (2, 32, g, g) and recon.shape == (2, 32, 24, 24)


def test_unreachable_grid_is_refused_clearly():
    with pytest.raises(ValueError, match="cannot be reached"):
        tc.stride_plan(24, 4, num_layers=1)  # 24 -> 4 is 2 x 3: two strided layers
    with pytest.raises(ValueError, match="does not divide"):
        tc.stride_plan(24, 5, num_layers=3)
    assert tc.stride_plan(24, 6, 3) == [2, 2, 1]
    assert tc.stride_plan(24, 8, 3) == [3, 1, 1]


class UnitGradientCritic(nn.Module):
    """f(x) = <w, x> with ||w|| = 1: its gradient has unit norm everywhere."""

    def __init__(self, shape):
        super().__init__()
        w = torch.randn(shape)
        self.w = nn.Parameter(w / w.norm())

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
    critic = UnitGradientCritic((8, 6, 6))
    real, fake = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    assert tc.gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        critic.w.mul_(3)  # gradient norm 3 -> penalty (3 - 1)^2 = 4
    assert tc.gradient_penalty(critic, real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_critic_has_no_batch_norm_and_scores_any_grid():
    for multiscale in (False, True):
        critic = tc.Critic(32, 16, multiscale)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
        assert critic(torch.randn(3, 32, 6, 6)).shape == (3,)


def test_train_resume_eval_infer(tiny_clip, tmp_path, capsys):
    data = tmp_path / "imagenet"
    for i in range(12):
        write_image(data / f"class{i % 3}" / f"img{i}.png", (56, 64), seed=i)
    out = tmp_path / "run"
    common = ["--clip_model", str(tiny_clip), "--data_dir", str(data), "--output_dir", str(out), "--batch_size", "4",
              "--num_workers", "0", "--no-progress", "--critic_hidden", "16", "--hidden_dim", "32", "--n_critic", "2",
              "--lr", "1e-3", "--cache_tokens", str(tmp_path / "cache"), "--val_fraction", "0.2"]  # fmt: skip
    first = tc.main(["train", *common, "--epochs", "1"])
    assert (out / "best_model.pt").is_file() and (out / "last_model.pt").is_file()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 12  # every image's CLIP tokens, written once
    later = tc.main(["train", *common, "--epochs", "4", "--resume"])
    assert later["epoch"] == 3 and later["step"] > first["step"]
    with pytest.raises(SystemExit) as exc:  # a resumed run keeps its settings: another lr is another run
        tc.main(["train", *common, "--epochs", "5", "--resume", "--lr", "1e-2"])
    assert exc.value.code == 2 and "differs from the resumed run" in capsys.readouterr().err
    assert later["model/mse"] < first["model/mse"]  # the losses moved
    ckpt = lic_common.load_checkpoint(out / "last_model.pt")
    assert ckpt["epoch"] == 3 and ckpt["opt_c"]["state"]

    metrics = tc.main(["eval", "--checkpoint", str(out / "best_model.pt"), "--data_dir", str(data), "--clip_model", str(tiny_clip),
                       "--num_workers", "0", "--no-progress"])  # fmt: skip
    for who in ("model", "avgpool+nearest", "avgpool+bilinear"):
        assert {f"{who}/mse", f"{who}/cosine", f"{who}/cosine_std", f"{who}/cosine_centred"} <= metrics.keys()
    assert {"critic/wasserstein", "critic/gp"} <= metrics.keys()

    result = tc.main(["infer", "--checkpoint", str(out / "best_model.pt"), "--image", str(data / "class0" / "img0.png"),
                      "--clip_model", str(tiny_clip), "--output", str(tmp_path / "grids.png")])  # fmt: skip
    assert result["compressed_shape"] == (32, 6, 6)
    assert "avgpool+bilinear" in capsys.readouterr().out
    assert (tmp_path / "grids.png").stat().st_size > 100

    # a checkpoint that does not match the flags is refused
    with pytest.raises(SystemExit):
        tc.main(["eval", "--checkpoint", str(out / "best_model.pt"), "--data_dir", str(data), "--output_grid_size", "8"])
    assert "--output_grid_size 6, not 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tc.main(["eval", "--checkpoint", str(out / "best_model.pt"), "--data_dir", str(data), "--clip_model", "other/clip"])
    assert "--clip_model" in capsys.readouterr().err


def test_an_uncached_clip_hub_id_fails_at_once_in_one_line_where_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(lic_common, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(RuntimeError) as exc:
        tc.load_clip("nobody/no-such-clip", torch.device("cpu"))
    assert "hub is not reachable" in str(exc.value) and "\n" not in str(exc.value) and "--clip_model" in str(exc.value)

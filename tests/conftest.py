"""Shared fixtures: tiny models and images made on the fly, so no test downloads anything."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=FutureWarning)

TRAIN_DIR = ROOT.parent / "shared" / "data" / "train"
KODAK_DIR = ROOT.parent / "shared" / "data" / "kodak"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Every test runs on the CPU, as CI does, also where a GPU is (the scripts' --device defaults
    to cuda when one is visible): only tests marked ``cuda`` see it, child processes included."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


TINY_UNET = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, layers_per_block=1,
                 attention_head_dim=4)  # fmt: skip


def make_bk_sdm(root: Path, vae: dict | None = None, **unet) -> Path:
    """A diffusers folder shaped like nota-ai/bk-sdm-small (vae/, unet/, scheduler/), tiny and random,
    with sizes unlike BK-SDM's (3 latent channels, a VAE downsampling by 2) so nothing may assume
    them; ``vae`` and ``unet`` override their configurations."""
    import bk_sdm_compression as bk

    base = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                latent_channels=3, norm_num_groups=8, sample_size=32, scaling_factor=0.5)  # fmt: skip
    unet = dict(sample_size=8, in_channels=3, out_channels=3, norm_num_groups=8, **(TINY_UNET | unet))
    return bk.save_random_bk_sdm(root, base | (vae or {}), unet)


@pytest.fixture(scope="session")
def tiny_bk_sdm(tmp_path_factory) -> Path:
    """``make_bk_sdm``'s default: cross-attention width 24, 4 heads, convolutional projections."""
    return make_bk_sdm(tmp_path_factory.mktemp("tiny-bk-sdm"))


@pytest.fixture(scope="session")
def tiny_bk_sdm_f8(tmp_path_factory) -> Path:
    """``make_bk_sdm`` with BK-SDM's downsampling by 8, for whole photographs (a Kodak image's latent
    is then 64 x 96, as under BK-SDM's VAE), one attention head."""
    vae = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16))
    return make_bk_sdm(tmp_path_factory.mktemp("tiny-bk-sdm-f8"), vae, attention_head_dim=1)  # one head: 6144 keys cost least


def write_image(path: Path, size=(40, 56), mode="RGB", seed=0) -> Path:
    """A smooth random picture (so codecs see structure, not white noise) of the given PIL mode."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)  # uint16 -> mode "I;16"
    elif mode != "RGB":
        img = img.convert(mode)
    if mode == "RGBA":  # translucent in places
        img.putalpha(Image.fromarray((base[:, :, 0] * 255).astype(np.uint8)).resize((w, h)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """A folder of six small training images in nested folders and two formats."""
    for i in range(6):
        write_image(tmp_path / "imgs" / f"sub{i % 2}" / f"im{i}.{'png' if i % 3 else 'jpg'}", (72, 80), seed=i)
    return tmp_path / "imgs"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP vision tower shaped like ViT-L/14-336's token grid (24x24) but 32 wide."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=2)
    CLIPVisionModel(config).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(root)
    return root

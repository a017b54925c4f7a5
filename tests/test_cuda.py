"""What only a CUDA device can check: a training step under AMP, the command line coding on the GPU,
and files crossing between CPU and GPU. Marked ``cuda``: skipped by default and by CI; run with
``-m cuda`` where a GPU is (``scripts/gpu_check.sh`` does)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bk_sdm_compression as bk
import train_bk_sdm_compression as tr
from conftest import write_image
from test_codec import perturbed, save_ckpt, tiny_model
from test_train_eval import TINY

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_training_run_with_amp_on_cuda(image_dir, tmp_path):
    out = tmp_path / "run"
    result = tr.main(["--data_path", str(image_dir), "--output_dir", str(out), *TINY, "--epochs", "2",
                      "--device", "cuda", "--amp", "--amp_dtype", "bfloat16"])  # fmt: skip
    assert result["step"] == 6 and all(torch.isfinite(torch.tensor(v)) for k, v in result.items() if k.startswith("val_"))
    assert json.loads((out / "config.json").read_text())["args"]["device"] == "cuda"
    # the best checkpoint codes a file on the CPU: the exact form built on the GPU is the CPU's
    src = write_image(tmp_path / "in.png", (48, 48))
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(out / "best_checkpoint.pth")])
    bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(out / "best_checkpoint.pth")])


@pytest.mark.parametrize("encoder,decoder", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_files_cross_between_devices_through_the_cli(tmp_path, encoder, decoder):
    ckpt = save_ckpt(perturbed(tiny_model()).eval(), tmp_path / "codec.pth")
    src = write_image(tmp_path / "in.png", (56, 40))
    bk.main(["compress", str(src), str(tmp_path / "a.bin"), "--checkpoint", str(ckpt), "--device", encoder])
    # a decoder that reached another latent would stop with exit code 2 (the file's digest)
    bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--device", decoder])
    bk.main(["decompress", str(tmp_path / "a.bin"), str(tmp_path / "b.png"), "--checkpoint", str(ckpt), "--device", "cpu"])
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 2  # the same latent; only the synthesis transform's float rounding differs

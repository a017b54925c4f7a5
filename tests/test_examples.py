"""The examples run and do what they say, at tiny sizes."""

import sys

import bk_sdm_compression as bk
from conftest import ROOT, write_image

sys.path.insert(0, str(ROOT / "examples"))


def test_custom_model_example_learns(image_dir):
    import custom_model_example

    short = custom_model_example.main(["--data_path", str(image_dir), "--steps", "2", "--N", "16"])
    longer = custom_model_example.main(["--data_path", str(image_dir), "--steps", "60", "--N", "16"])
    assert longer["psnr"] > short["psnr"]


def test_train_example_codes_an_image(image_dir):
    import train_example

    result = train_example.main(["--data_path", str(image_dir), "--steps", "3", "--N", "16", "--M", "16", "--diffusion_steps", "2"])
    assert result["bpp"] > 0 and result["psnr"] > 0


def test_evaluate_example_on_a_trained_checkpoint(image_dir, tmp_path):
    import evaluate_example
    import train_bk_sdm_compression as tr

    tr.main(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), "--N", "8", "--M", "8",
             "--diffusion_steps", "2", "--unet_channels", "8", "--image_size", "64", "--val_image_size", "64",
             "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--no-progress"])  # fmt: skip
    result = evaluate_example.main(["--checkpoint", str(tmp_path / "run" / "best_checkpoint.pth"), "--data_path", str(image_dir)])
    # real bytes: at least the estimate; on 72x80 px the file's fixed bytes are most of it (header 40,
    # CRC 4, per string a 4-byte length, a 4-byte coder flush and up to 3 bytes of word padding)
    pixels = 72 * 80
    strings = 3  # two revealed groups of the latent, then z: each a 4-byte length and the coder's flush
    fixed = bk._HEADER.size + 4 + strings * (4 + 7)
    assert result["bpp_estimate"] * 0.95 <= result["bpp"] <= result["bpp_estimate"] + 8 * (fixed + 2) / pixels


def test_demo_compares_with_jpeg_and_webp_at_the_same_size(image_dir, tmp_path):
    import demo
    import train_bk_sdm_compression as tr

    tr.main(["--data_path", str(image_dir), "--output_dir", str(tmp_path / "run"), "--N", "8", "--M", "8",
             "--diffusion_steps", "2", "--unet_channels", "8", "--image_size", "64", "--val_image_size", "64",
             "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--no-progress"])  # fmt: skip
    out = tmp_path / "demo"
    result = demo.main(["--output_dir", str(out), "--checkpoint", str(tmp_path / "run" / "best_checkpoint.pth")])
    assert len(result["rows"]) == 3 * len(demo.TEST_PHOTOS)
    ours, jpeg, webp = result["rows"][:3]
    assert (ours["codec"], jpeg["codec"], webp["codec"]) == ("diffusion-hyperprior", "jpeg", "webp")
    assert ours["bytes"] == (out / "chelsea_best_checkpoint.bksd").stat().st_size
    assert all(r["bytes"] <= ours["bytes"] or r["setting"] == "q1" for r in (jpeg, webp))  # q1: nothing smaller exists
    assert all((out / f"side_by_side_{name}.png").is_file() for name in demo.TEST_PHOTOS) and (out / "rd_plot.png").is_file()
    curves = demo.mean_curves(result["rows"])
    assert curves["jpeg"]["results"]["bpp"] == [sum(r["bpp"] for r in result["rows"] if r["codec"] == "jpeg") / 3]


def test_same_size_classical_picks_the_largest_quality_that_fits(tmp_path):
    import io

    import demo
    import lic_common
    from PIL import Image

    x = lic_common.load_image(write_image(tmp_path / "a.png", (96, 128)))
    img = Image.fromarray(lic_common.to_uint8(x).permute(1, 2, 0).numpy())

    def size(q):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=q)
        return buf.tell()

    budget = size(50) + 1
    quality, n_bytes, decoded = demo.same_size_classical(x, "JPEG", budget)
    assert n_bytes == size(quality) <= budget < size(quality + 1)
    assert decoded.shape == x.shape

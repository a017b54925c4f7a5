"""The student decoder recipe (finetune_after_distill.py)."""

import json

import pytest
import torch
import torch.nn as nn
from compressai.models import FactorizedPrior

import finetune_after_distill as fd
import lic_common
from conftest import write_image


@pytest.fixture
def teacher_ckpt(tmp_path):
    """A tiny bmshj2018-factorized saved as CompressAI's training script saves it."""
    torch.manual_seed(0)
    teacher = FactorizedPrior(8, 12)
    path = tmp_path / "teacher.pth"
    lic_common.save_checkpoint({"state_dict": teacher.state_dict()}, path)
    return path


@pytest.fixture
def teacher(teacher_ckpt):
    return fd.load_teacher(fd.parse_args(["eval", "--data_path", "x", "--teacher_checkpoint", str(teacher_ckpt)]))


def test_replacement_reaches_every_transposed_conv_of_g_s_and_nothing_else(teacher):
    student = fd.make_student(teacher)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in student.g_s.modules())
    assert sum(isinstance(m, fd.UpsampleConv) for m in student.g_s) == sum(isinstance(m, nn.ConvTranspose2d) for m in teacher.g_s) == 4
    # everything outside g_s is untouched, and identical to the teacher
    for name, p in teacher.named_parameters():
        if not name.startswith("g_s."):
            assert torch.equal(p, dict(student.named_parameters())[name]), name
    assert not any(isinstance(m, fd.UpsampleConv) for m in student.g_a.modules())
    for h, w in ((33, 47), (64, 64), (17, 90)):
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            assert teacher(x)["x_hat"].shape == student(x)["x_hat"].shape


def test_initialisation_is_the_least_squares_match():
    torch.manual_seed(0)
    t = nn.ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1)
    new = fd.upsample_conv_like(t)
    x = torch.randn(4, 6, 12, 12)
    err = (t(x) - new(x)).norm() / t(x).norm()
    random_err = (t(x) - fd.UpsampleConv(6, 5)(x)).norm() / t(x).norm()
    assert err < 0.6 < 1.5 < random_err  # the best any upsample+conv can do on white inputs is ~0.55
    # least squares: a small step in any direction does not reduce the error on white inputs
    with torch.no_grad():
        base = (t(x) - new(x)).pow(2).sum()
        new[1].weight.add_(torch.randn_like(new[1].weight) * 1e-3)
        assert (t(x) - new(x)).pow(2).sum() >= base * 0.999


def test_phase_form_is_upsample_then_conv():
    """UpsampleConv computes at the input's resolution; it must equal, value and gradient, the
    Upsample + Conv2d its parameters describe (odd sizes: the borders' zero padding)."""
    torch.manual_seed(0)
    layer = fd.UpsampleConv(6, 5)
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    reference = nn.Sequential.forward(layer, x)  # the literal Upsample, then Conv2d
    out = layer(x)
    assert out.shape == reference.shape == (2, 5, 18, 14)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    params = [x, layer[1].weight, layer[1].bias]
    for a, b in zip(torch.autograd.grad(reference.pow(2).sum(), params), torch.autograd.grad(out.pow(2).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "stage,flags,expected",
    [
        ("distill", {}, {"conv"}),
        ("distill", {"train_igdn": True}, {"conv", "igdn"}),
        ("distill", {"unfreeze_all": True}, {"conv", "igdn", "g_a", "entropy"}),
        ("finetune", {}, {"conv", "igdn"}),
        ("finetune", {"freeze_igdn": True}, {"conv"}),
    ],
)
def test_which_parameters_train(teacher, stage, flags, expected):
    student = fd.make_student(teacher)
    names = fd.set_trainable(student, stage, **flags)
    kinds = set()
    for n in names:
        if n.startswith("g_s."):
            kinds.add("conv" if isinstance(student.g_s[int(n.split(".")[1])], fd.UpsampleConv) else "igdn")
        else:
            kinds.add("g_a" if n.startswith("g_a.") else "entropy")
    assert kinds == expected
    assert all(p.requires_grad == (n in names) for n, p in student.named_parameters())


def test_split_is_deterministic_across_runs_and_machines(tmp_path):
    names = [f"{i:012d}.jpg" for i in range(200)]
    val = [n for n in names if lic_common.in_validation_split(n, 0.05)]
    # fixed by MD5 of the name (md5("000000000029.jpg") starts 08e5..., 0.035 < 0.05): the same on
    # any machine and Python version, unlike hash() or a seeded shuffle
    assert val == ["000000000029.jpg", "000000000040.jpg", "000000000052.jpg", "000000000077.jpg",
                   "000000000124.jpg", "000000000190.jpg"]  # fmt: skip
    assert [n for n in names if lic_common.in_validation_split(n, 0.05)] == val


def test_distill_finetune_eval_end_to_end(tmp_path, teacher_ckpt, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default save dirs are relative: ./checkpoints, ./checkpoints_ft
    for i in range(6, 12):
        write_image(image_dir / f"more{i}.png", (80, 72), seed=i)
    t = ["--teacher_checkpoint", str(teacher_ckpt)]
    fd.main(["prepare", "--coco_dir", str(image_dir), "--out_dir", "d64", "--crop_size", "64", "--val_ratio", "0.3", "--no-progress"])
    n_val = len(list((tmp_path / "d64" / "val").iterdir()))
    assert n_val >= 1 and len(list((tmp_path / "d64" / "train").iterdir())) == 12 - n_val
    common = ["--coco_dir", "d64", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0", "--no-progress",
              "--recon_every", "2", "--recon_count", "3", "--lr", "1e-3", *t]  # fmt: skip
    fd.main(["distill", *common, "--epochs", "4"])
    ck = tmp_path / "checkpoints"
    assert (ck / "last.pt").is_file() and (ck / "best_msssim.pt").is_file()
    tags = sorted(p.name for p in (ck / "recon").iterdir())
    assert tags == ["e001", "e003", "pre_e000"]
    assert sorted(p.name for p in (ck / "recon" / "e003").iterdir()) == [f"{i:05d}.png" for i in range(min(3, n_val))]
    assert list((ck / "tensorboard" / "distill").glob("events.*"))

    # --resume continues the stage where it stopped
    resumed = fd.main(["distill", *common, "--epochs", "5", "--resume"])
    assert lic_common.load_checkpoint(ck / "last.pt")["epoch"] == 4 and "best_msssim" in resumed
    # a resumed stage keeps its settings: the data flags suffice, another loss weight is refused
    fd.main(["distill", "--coco_dir", "d64", "--resume", "--epochs", "5", "--num_workers", "0", "--no-progress", *t])
    assert lic_common.load_checkpoint(ck / "last.pt")["config"]["batch_size"] == 4
    with pytest.raises(SystemExit) as exc:
        fd.main(["distill", *common, "--epochs", "6", "--resume", "--l1_weight", "2.0"])
    assert exc.value.code == 2

    # after distill with default flags, the student decodes the teacher's bitstreams
    teacher = fd.load_teacher(fd.parse_args(["eval", "--data_path", "x", *t]))
    student = fd.make_student(teacher)
    student.load_state_dict(lic_common.load_checkpoint(ck / "best_msssim.pt")["student"])
    student.update(force=True)
    x = lic_common.load_image(image_dir / "more6.png")[None][..., :64, :64]
    with torch.no_grad():
        enc = teacher.compress(x)
        y_teacher = teacher.entropy_bottleneck.decompress(enc["strings"][0], enc["shape"])
        y_student = student.entropy_bottleneck.decompress(enc["strings"][0], enc["shape"])
        x_student = student.decompress(enc["strings"], enc["shape"])["x_hat"]
    assert torch.equal(y_teacher, y_student) and x_student.shape == x.shape

    fd.main(["finetune", *common, "--epochs", "2"])
    ft = tmp_path / "checkpoints_ft"
    assert (ft / "ft_last.pt").is_file() and (ft / "ft_best.pt").is_file()
    assert sorted(p.name for p in (ft / "recon_ft").iterdir()) == ["e001", "pre_e000"]

    result = fd.main(["eval", "--data_path", str(image_dir), "--checkpoint", str(ft / "ft_best.pt"), *t,
                      "--output", str(tmp_path / "eval.json")])  # fmt: skip
    assert result["student_decodes_teacher_bitstreams"] is True
    assert result["bpp"] > 0 and {"teacher_checkerboard_db", "student_checkerboard_db", "student_vs_teacher_psnr"} <= result.keys()
    assert json.loads((tmp_path / "eval.json").read_text())["mean"]["bpp"] == result["bpp"]


def test_checkerboard_energy_sees_a_checkerboard():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    noise = x + 0.02 * torch.randn_like(x)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = x + 0.02 * ((yy + xx) % 2 * 2 - 1).float()
    assert abs(fd.checkerboard_energy(x, noise)) < 1.5
    assert fd.checkerboard_energy(x, board) > 10


def test_unfreeze_all_says_it_breaks_bitstream_compatibility(tmp_path, teacher_ckpt, image_dir, capsys):
    fd.main(["distill", "--coco_dir", str(image_dir), "--use_prepared", "false", "--crop_size", "64", "--batch_size", "4",
             "--num_workers", "0", "--no-progress", "--epochs", "1", "--unfreeze_all", "--save_dir", str(tmp_path / "c"),
             "--teacher_checkpoint", str(teacher_ckpt), "--val_ratio", "0.3"])  # fmt: skip
    assert "no longer decode the teacher's bitstreams" in capsys.readouterr().out


def test_wrong_teacher_checkpoint_is_a_clear_error(tmp_path, capsys):
    lic_common.save_checkpoint({"architecture": "mbt2018", "state_dict": {}}, tmp_path / "t.pth")
    with pytest.raises(SystemExit):
        fd.main(["eval", "--data_path", str(tmp_path), "--teacher_checkpoint", str(tmp_path / "t.pth")])
    assert "the teacher is bmshj2018-factorized" in capsys.readouterr().err


def test_crops_on_the_fly_give_many_distinct_downscaled_crops(image_dir):
    files = lic_common.list_images(image_dir)[:2]
    crops = fd.Crops(files, 32, random_crop=True, downscale=(0.5, 1.0), length=10)
    batch = torch.stack([crops[i] for i in range(len(crops))])
    assert len(crops) == 10 and batch.shape == (10, 3, 32, 32)
    assert len({tuple(c.flatten()[:16].tolist()) for c in batch}) == 10  # ten different crops of two images
    val = fd.Crops(files, 32, random_crop=False, downscale=(0.5, 1.0))
    assert len(val) == 2 and torch.equal(val[0], val[0])
    with pytest.raises(SystemExit):
        fd.parse_args(["distill", "--coco_dir", str(image_dir), "--downscale_min", "0.9", "--downscale_max", "0.5"])


def test_slim_student_holds_the_decoder_alone_and_loads_like_the_full_one(teacher, tmp_path):
    student = fd.make_student(teacher)
    with torch.no_grad():
        for p in student.g_s.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = {"kind": "student", "stage": "finetune", "epoch": 3, "metrics": {}, "student": student.state_dict(), "optimizer": {}}
    lic_common.save_checkpoint(fd.slim_student(full), tmp_path / "slim.pt")
    slim = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert slim["decoder_only"] and "optimizer" not in slim and all(k.startswith("g_s.") for k in slim["student"])
    loaded = fd.make_student(teacher)
    fd.load_student(loaded, tmp_path / "slim.pt")
    y = torch.randn(1, 12, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.g_s(y), student.g_s(y), rtol=2e-3, atol=2e-3)  # fp16 where exact enough
    lic_common.save_checkpoint({"kind": "student", "student": {"g_s.0.weight": torch.zeros(1)}, "decoder_only": True}, tmp_path / "bad.pt")
    with pytest.raises(lic_common.CheckpointError, match="does not fit"):
        fd.load_student(fd.make_student(teacher), tmp_path / "bad.pt")


@pytest.mark.parametrize("flags", [["--batch_size", "0"], ["--epochs", "0"], ["--lr", "-1"]])
def test_stage_flags_out_of_range_are_refused(flags, tmp_path, capsys):
    import finetune_after_distill as fad

    with pytest.raises(SystemExit) as exc:
        fad.parse_args(["distill", "--coco_dir", str(tmp_path), *flags])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err

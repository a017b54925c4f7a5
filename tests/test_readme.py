"""The README's quick start runs as written: compress / decompress for real with a shipped
checkpoint, every other command's flags through its script's own parser."""

import glob
import importlib
import re
import shlex

import pytest

from conftest import KODAK_DIR, ROOT


def quick_start_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_the_quick_start_is_in_the_readme_and_small():
    commands = quick_start_commands()
    assert len(commands) >= 7 and all(c[0] == "python" for c in commands)
    assert (ROOT / "README.md").stat().st_size <= 25_000


def with_flags(args: list[str], flags: dict[str, str]) -> list[str]:
    """``args`` with each flag's value replaced (or the flag added)."""
    args = list(args)
    for flag, value in flags.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


@pytest.mark.skipif(not KODAK_DIR.is_dir(), reason="needs ../shared/data/kodak")
def test_every_quick_start_command_runs_as_written(tmp_path, monkeypatch, tiny_bk_sdm_f8):
    """The coding commands run for real; the BK-SDM training too, offline: a tiny random folder in
    place of the hub's BK-SDM, two steps on the CPU, whose checkpoint the next commands code with."""
    monkeypatch.chdir(ROOT)
    runs = {}
    for argv in quick_start_commands():
        script, args = argv[1], [a for part in argv[2:] for a in (sorted(glob.glob(part)) if "*" in part else [part])]
        module = importlib.import_module(script.removesuffix(".py"))
        if script == "train_bk_sdm_compression.py" and "--use_pretrained_unet" in args:
            out = args[args.index("--output_dir") + 1]
            runs[out] = tmp_path / "runs" / out
            small = {"--bk_sdm_path": str(tiny_bk_sdm_f8), "--output_dir": str(runs[out]), "--device": "cpu", "--max_steps": "2",
                     "--image_size": "64", "--val_image_size": "64", "--batch_size": "2", "--num_workers": "0", "--N": "8"}  # fmt: skip
            assert module.main(with_flags(args, small) + ["--no-amp", "--no-progress"])
        elif script == "bk_sdm_compression.py":  # for real, its outputs moved to a temporary folder
            args[2] = str(tmp_path / args[2])
            if args[0] == "decompress":
                args[1] = str(tmp_path / args[1])
            checkpoint = args[args.index("--checkpoint") + 1]
            for out, folder in runs.items():
                if checkpoint.startswith(out + "/"):
                    args[args.index("--checkpoint") + 1] = str(folder / checkpoint[len(out) + 1 :])
            if args[0] == "compress" and "reference_checkpoints/" in checkpoint:  # the shipped one at effort 0 (the search is
                args += ["--effort", "0"]  # tested on tiny models; the BK-SDM command below keeps the default effort)
            assert module.main(args)
        else:
            assert module.parse_args(args)  # the flags exist and their values are accepted
    assert (tmp_path / "kodim23.png").is_file() and (tmp_path / "kodim23-bksdm.png").is_file()

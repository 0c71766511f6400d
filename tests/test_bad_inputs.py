"""The bad-input matrix (README "When things go wrong"): every case a user can cause ends in one line on stderr and
exit code 1, a listed skip, or the right result; nothing the user has is overwritten or executed.

Each case runs an entry point in-process through ``cli.run``, exactly as ``python experiments/<script>.py`` does,
and fails before any model is built (so the whole matrix takes seconds).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.covid_radiography import CovidRadiographyDataModule
from experiments import (
    counterfactual_attribution,
    evaluate,
    train,
    train_autoencoder,
    train_classifier,
    zero_shot_induction,
)
from lightning_modules.checkpoints import AtomicCheckpointIO, CheckpointError, newest_readable, read_checkpoint
from lightning_modules.runs import cli
from tests.fixtures_real_data import encode, gray, make_covid_tree, write

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "train": train.main,
    "train_autoencoder": train_autoencoder.main,
    "train_classifier": train_classifier.main,
    "attribution": counterfactual_attribution.main,
    "evaluate": evaluate.main,
    "induction": zero_shot_induction.main,
}
STAGE2 = {"unet": {}, "image_size": 64, "sampling": {"num_inference_steps": 5, "guidance_scale": 3.0}}


class Payload:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Checkpoints good and bad, a file where a folder should be, and a COVID-layout tree."""
    good = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": STAGE2}, good)
    data = good.read_bytes()
    made = {
        "stage2": good,
        "empty": write(tmp_path / "empty.ckpt", b""),
        "truncated": write(tmp_path / "truncated.ckpt", data[: len(data) // 2]),
        "garbage": write(tmp_path / "garbage.ckpt", np.random.default_rng(0).bytes(4096)),
        "text": write(tmp_path / "text.ckpt", b"not a checkpoint\n"),
        "file": write(tmp_path / "a_file", b"x"),
        "marker": tmp_path / "payload-ran",
    }
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"finding_names": ["nodule"]}}, tmp_path / "classifier.ckpt")
    torch.save({"state_dict": {}, "extra": Payload(made["marker"])}, tmp_path / "payload.ckpt")
    made.update({k: tmp_path / f"{k}.ckpt" for k in ("plain", "classifier", "payload")})
    return made


def run_script(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run an entry point as its ``__main__`` does; its exit code and its stderr."""
    with pytest.raises(SystemExit) as stop:
        cli.run(SCRIPTS[script], argv)
    code = stop.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("message"): Python prints it on stderr and exits with 1
        return 1, code
    return code, err


# case: (script, arguments ({name} = a path from `files`), what the one line says)
CASES = [
    ("train", ["trainer.max_steps=abc"], "trainer.max_steps must be an integer (default 2000), got 'abc'"),
    ("train", ["data.image_size=63"], "data.image_size=63 is not a multiple of 4"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps must be an integer >= 1"),
    ("train", ["model=large"], "unknown model 'large'; valid choices: cpu, gpu"),
    ("train", ["trainer.acelerator=gpu"], "unknown key 'trainer.acelerator'"),
    ("train", ["trainer.accelerator=gpu"], "torch sees no CUDA GPU on this machine: run with GPUS=0"),
    ("train", ["ckpt_path={classifier}"], "is a finding classifier checkpoint, not a stage-2 latent diffusion one"),
    ("train", ["ckpt_path={truncated}"], "is not a readable PyTorch checkpoint"),
    ("train", ["ckpt_path=/nowhere/last.ckpt"], "no file at /nowhere/last.ckpt"),
    ("train", ["log_dir={file}"], "log_dir="),
    ("train_autoencoder", ["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    ("train_autoencoder", ["model.autoencoder.optimizer.lr=-1"], "lr must be a number > 0"),
    ("train_classifier", ["data=covid_radiography", "data.root=/no/such/root"], "dataset root /no/such/root"),
    ("train_classifier", ["ckpt_path={stage2}"], "is a stage-2 latent diffusion checkpoint, not a finding classifier"),
    ("attribution", ["checkpoint={empty}"], "is empty"),
    ("attribution", ["checkpoint={garbage}"], "is not a readable PyTorch checkpoint"),
    ("attribution", ["checkpoint={text}"], "is not a readable PyTorch checkpoint"),
    ("attribution", ["checkpoint={plain}"], "is not a VALD Lightning checkpoint"),
    ("attribution", ["checkpoint={payload}"], "refused: loading it would import"),
    ("attribution", ["checkpoint={stage2}", "methods=[paint]"], "methods: unknown 'paint'; choose from"),
    ("attribution", ["checkpoint={stage2}", "sdedit.guidance_scale=-1"], "sdedit.guidance_scale must be a number >= 0"),
    ("attribution", ["checkpoint={stage2}", "output_dir={file}/out"], "output_dir="),
    ("evaluate", ["checkpoint={classifier}"], "is a finding classifier checkpoint, not a stage-2"),
    ("evaluate", ["checkpoint={stage2}", "num_images=0"], "num_images must be an integer >= 1 or null, got 0"),
    ("evaluate", ["checkpoint={stage2}", "split=holdout"], "split 'holdout'"),
    ("induction", ["checkpoint={stage2}", "prompt="], "override 'prompt=' has no value"),
    ("induction", ["checkpoint={stage2}", "induction.guidance_scale=-1"], "guidance_scale must be a number >= 0"),
    ("induction", ["checkpoint={stage2}", "induction.resample=0"], "resample must be an integer >= 1"),
    ("induction", ["checkpoint={stage2}", "induction.background_steps=-5"], "background_steps must be an integer"),
    ("induction", ["checkpoint={stage2}", "finding=tumour"], "unknown finding 'tumour'"),
    ("induction", ["checkpoint={stage2}", "box=40,40,80,60"], "outside the 64x64 image"),
    ("induction", ["checkpoint={stage2}", "seeds=abc"], "seeds must be a list"),
]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_every_bad_input_ends_in_one_line(script, argv, message, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders land here, never in the repository
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if script.startswith("train") and not any(a.startswith("log_dir=") for a in argv):
        argv.append(f"log_dir={tmp_path / 'logs'}")
    code, err = run_script(script, argv, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not files["marker"].exists()  # the payload never ran


def test_an_earlier_run_is_refused_not_overwritten(tmp_path, capsys):
    folder = tmp_path / "ldm" / "checkpoints"
    torch.save({"state_dict": {}, "hyper_parameters": STAGE2}, folder.mkdir(parents=True) or folder / "last.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    code, err = run_script("train", [f"log_dir={tmp_path}"], capsys)
    assert code == 1 and "already holds last.ckpt from an earlier run: continue it with ckpt_path=last" in err
    assert (folder / "last.ckpt").read_bytes() == before


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    torch.save({"state_dict": {}, "hyper_parameters": STAGE2}, tmp_path / "best.ckpt")
    write(tmp_path / "last.ckpt", (tmp_path / "best.ckpt").read_bytes()[:100])  # killed mid-write by another tool
    assert newest_readable(tmp_path) == tmp_path / "best.ckpt"
    assert "resuming from" in caplog.text and "last.ckpt" in caplog.text
    (tmp_path / "best.ckpt").unlink()
    assert newest_readable(tmp_path) is None


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": STAGE2}, path)
    before = path.read_bytes()

    def full_disk(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": STAGE2}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert read_checkpoint(path, "stage-2 latent diffusion")["state_dict"]["w"].sum() == 3


def test_os_errors_name_the_file_and_the_remedy(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.png")

    with pytest.raises(SystemExit) as stop:
        cli.run(full, [])
    assert stop.value.code == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: No space left on device: /data/out/x.png (free some space or choose another output folder)")
    )


def test_an_unexpected_error_is_one_line_and_vald_debug_shows_the_traceback(capsys, monkeypatch):
    def bug(argv):
        raise RuntimeError("shapes (2, 3) and (4, 5)\ncannot be multiplied")

    with pytest.raises(SystemExit):
        cli.run(bug, [])
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "RuntimeError: shapes (2, 3) and (4, 5) cannot be multiplied" in line
    assert "VALD_DEBUG=1 shows the traceback" in line
    monkeypatch.setenv("VALD_DEBUG", "1")
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        cli.run(bug, [])


def test_a_checkpoint_of_the_wrong_kind_is_named(files):
    with pytest.raises(CheckpointError, match="is a stage-2 latent diffusion checkpoint, not a stage-1 autoencoder"):
        read_checkpoint(files["stage2"], "stage-1 autoencoder")


def test_names_differing_in_case_or_extension_stay_distinct_samples(tmp_path, caplog):
    root = make_covid_tree(tmp_path, sheets=False)
    write(root / "COVID" / "images" / "COVID-1.PNG", encode(gray(seed=99)))
    dm = CovidRadiographyDataModule(str(root), image_size=16, batch_size=2, num_workers=0)
    dm.setup()
    ids = set().union(*(set(d.ids) for d in dm.datasets.values()))
    assert {"COVID/images/COVID-1.png", "COVID/images/COVID-1.PNG"} <= ids
    assert "differ only in case or extension, each kept: COVID-1.PNG, COVID-1.png" in caplog.text


def test_a_dataset_root_with_spaces_reaches_the_config_whole():
    out = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "train",
            "DATA=covid_radiography",
            "DATA_ROOT=/data/dir with space",
            "STAMP=/dev/null",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'data.root=/data/dir with space'" in out

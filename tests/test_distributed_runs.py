"""Attribution and induction through Lightning's predict on several processes (2 gloo ranks here), killed and
resumed: every image once, and the same bytes as one uninterrupted process. The one-process references run inside
the test process (a fresh interpreter's imports cost ~15 s on 2 cores); every run on 2 processes, or killed, is a
process of its own, as users start it."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments import counterfactual_attribution, evaluate, zero_shot_induction
from lightning_modules.runs.units import Parts, claim_output, fingerprint, plan_units
from tests.test_counterfactual_script import FEW_STEPS, checkpoints  # noqa: F401 (checkpoints: a module fixture)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 7  # 4 units of 2: rank 0 takes units 0 and 2, rank 1 units 1 and 3 (the short one)


def attribution(checkpoints: dict, out: Path, *overrides: str) -> list[str]:  # noqa: F811
    """The arguments of a 2-step attribution of the ``IMAGES`` test phantoms into ``out``."""
    return [
        "experiment=smoke",
        f"checkpoint={checkpoints['checkpoint']}",
        f"classifier_checkpoint={checkpoints['classifier_checkpoint']}",
        f"output_dir={out}",
        "progress=false",
        "num_threads=1",  # the same threads per process in every run: the kernels' sums then agree bit for bit
        "data.num_train=24",
        "data.num_val=6",
        f"data.num_test={IMAGES}",
        "num_images=null",
        *FEW_STEPS,
        *overrides,
    ]


def command(checkpoints: dict, out: Path, *overrides: str) -> list[str]:  # noqa: F811
    """``attribution`` as a process of its own (the runs on 2 processes, and the ones killed)."""
    return [sys.executable, "experiments/counterfactual_attribution.py", *attribution(checkpoints, out, *overrides)]


def induction(checkpoints: dict, out: Path, *overrides: str) -> list[str]:  # noqa: F811
    """The arguments of an induction of an effusion at 2 steps, into ``out``."""
    return [
        "experiment=smoke",
        f"checkpoint={checkpoints['checkpoint']}",
        f"classifier_checkpoint={checkpoints['classifier_checkpoint']}",
        f"output_dir={out}",
        "induction.num_inference_steps=2",
        "finding=effusion",
        *overrides,
    ]


def induce(checkpoints: dict, out: Path, *overrides: str) -> list[str]:  # noqa: F811
    """``induction`` as a process of its own."""
    return [sys.executable, "experiments/zero_shot_induction.py", *induction(checkpoints, out, *overrides)]


def files(out: Path) -> dict[str, bytes]:
    """Every output file but the saved run (its config records the process count)."""
    saved = ("config.yaml", "run.json")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in saved}


@pytest.fixture(scope="module")
def one_process(checkpoints, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: one process, run in this one (the import of a fresh interpreter costs ~15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("one")
    counterfactual_attribution.main(attribution(checkpoints, out))
    return out


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(checkpoints, one_process, tmp_path):  # noqa: F811
    two = tmp_path / "two"
    subprocess.run(command(checkpoints, two, "devices=2"), cwd=ROOT, check=True, capture_output=True)
    rows = list(csv.DictReader(open(two / "results.csv")))
    assert [r["id"] for r in rows] == [f"test-{i:06d}" for i in range(IMAGES)]  # each once, in order
    expected, written = files(one_process), files(two)
    assert len(expected) > 7 * 7 and "metrics.json" in expected and not (two / "parts").exists()
    assert sorted(written) == sorted(expected)
    assert [name for name in expected if written[name] != expected[name]] == []


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped_and_ends_identical(checkpoints, one_process, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    run = command(checkpoints, out)
    process = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not Parts(out).done():
        time.sleep(0.01)
    process.kill()  # SIGKILL after the first committed unit: no handler runs
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-2000:]}"
    done = Parts(out).done()
    assert 0 < len(done) < 4 and not (out / "results.csv").exists()
    resumed = subprocess.run(run, cwd=ROOT, check=True, capture_output=True, text=True)
    expected, written = files(one_process), files(out)
    assert sorted(written) == sorted(expected)
    assert [name for name in expected if written[name] != expected[name]] == []
    again = subprocess.run(run, cwd=ROOT, check=True, capture_output=True, text=True)  # finished: nothing redone
    assert "already holds this run's results" in again.stdout and files(out) == written
    assert resumed.returncode == 0


@pytest.mark.slow
def test_induction_on_two_processes_writes_what_one_process_writes(checkpoints, tmp_path):  # noqa: F811
    """5 normal phantoms x 2 seeds in batches of 2: 6 units, 3 per rank."""
    outs = {devices: tmp_path / f"induce{devices}" for devices in (1, 2)}
    settings = ["num_threads=1", "data.num_test=24", "num_images=5", "batch_size=2", "seeds=[0,1]"]
    zero_shot_induction.main(induction(checkpoints, outs[1], *settings))
    subprocess.run(induce(checkpoints, outs[2], *settings, "devices=2"), cwd=ROOT, check=True, capture_output=True)
    one, two = (files(outs[d]) for d in (1, 2))
    assert sorted(one) == sorted(two) and len([n for n in one if n.startswith("induced/")]) == 10
    assert [name for name in one if name != "metrics.json" and one[name] != two[name]] == []
    metrics = [json.loads(one.pop("metrics.json")), json.loads(two.pop("metrics.json"))]
    for m in metrics:
        del m["seconds"], m["config"]["output_dir"]
    assert metrics[0] == metrics[1] and len(metrics[0]["per_sample"]) == 10


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_numbers_of_one_process(checkpoints, tmp_path):  # noqa: F811
    """7 images in batches of 2: FID (domain), SSIM, MS-SSIM per class and prompt fidelity, merged in unit order."""
    reports = []
    for devices in (1, 2):
        out = tmp_path / f"evaluate{devices}"
        run = [
            "experiment=smoke",
            f"checkpoint={checkpoints['checkpoint']}",
            f"classifier_checkpoint={checkpoints['classifier_checkpoint']}",
            f"output_dir={out}",
            "num_threads=1",
            f"data.num_test={IMAGES}",
            "num_images=null",
            "batch_size=2",
            "generation.num_inference_steps=2",
            "counterfactual.num_inference_steps=2",
            "counterfactual.strength=0.5",
            "fid.inception=false",
        ]
        if devices == 1:
            evaluate.main(run)
        else:
            two = [sys.executable, "experiments/evaluate.py", *run, "devices=2"]
            subprocess.run(two, cwd=ROOT, check=True, capture_output=True)
        assert not (out / "parts").exists()
        reports.append((out / "metrics.json").read_bytes())
    assert reports[0] == reports[1]
    report = json.loads(reports[0])
    assert report["num_images"] == IMAGES and report["results"]["overall"]["n"] == IMAGES
    assert report["results"]["overall"]["generated"]["fid_domain"] is not None


def test_units_cover_every_index_once_on_any_number_of_ranks(tmp_path):
    units = plan_units(list(range(11)), 3)
    assert units == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    parts = Parts(tmp_path)
    for world in (1, 2, 3, 5):
        shares = [parts.pending(len(units), rank, world) for rank in range(world)]
        assert sorted(u for share in shares for u in share) == list(range(4))  # no padding, no duplicate
    parts.commit(2, {"rows": []})
    assert parts.done() == {2}  # what is left is dealt again: rank 0 of 2 takes units 0 and 3, rank 1 unit 1
    assert parts.pending(len(units), 0, 2) == [0, 3] and parts.pending(len(units), 1, 2) == [1]
    with pytest.raises(RuntimeError, match="3 of 4 units have no results"):
        list(parts.load(4))


def test_an_output_dir_holding_another_run_is_refused(tmp_path):
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"weights")
    out = tmp_path / "out"
    cfg = OmegaConf.create({"seed": 0, "devices": 1, "output_dir": str(out)})
    ours = lambda: fingerprint([str(model)], [[0, 1], [2]])  # noqa: E731
    claim_output(cfg, out, ours())
    claim_output(OmegaConf.merge(cfg, {"seed": 2}), out, ours())  # nothing written but the config: replaced
    claim_output(cfg, out, ours())
    Parts(out).commit(0, {"rows": []})
    claim_output(OmegaConf.merge(cfg, {"devices": 4}), out, ours())  # the same run on other devices: resumed
    with pytest.raises(ValueError, match=r"holds a run with other settings or models \(seed differ"):
        claim_output(OmegaConf.merge(cfg, {"seed": 1}), out, ours())
    with pytest.raises(ValueError, match=r"\(plan differ"):
        claim_output(cfg, out, fingerprint([str(model)], [[0], [1, 2]]))
    model.write_bytes(b"retrained")  # another model at the same path
    with pytest.raises(ValueError, match=r"\(files differ"):
        claim_output(cfg, out, ours())
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "metrics.json").write_text("{}")  # results of something else, no run of ours
    with pytest.raises(ValueError, match="already holds files .* but no run of ours"):
        claim_output(cfg, tmp_path / "theirs", ours())


@pytest.mark.slow
def test_fewer_units_than_ranks_leaves_a_rank_idle_not_failing(checkpoints, tmp_path):  # noqa: F811
    out = tmp_path / "one_unit"
    run = induce(checkpoints, out, "num_images=1", "seeds=[0]", "devices=2")
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads((out / "metrics.json").read_text())["per_sample"]) == 1

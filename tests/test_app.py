"""The web app (experiments/app.py) on the smoke checkpoints: what it asks of the model, and the page driven in
headless Chromium as a user would (`make browser` installs Debian's Chromium; `make test` does it first)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments import app
from lightning_modules.app import browser
from lightning_modules.app.service import Explorer
from tests.fixtures_real_data import encode, gray, write
from tests.test_counterfactual_script import checkpoints  # noqa: F401 (the smoke checkpoints, a module fixture)

SETTINGS = {"method": "sdedit", "amount": 0.5, "guidance_scale": 3.0, "steps": 4, "seed": 0}


def config(checkpoints: dict, tmp_path, **values):  # noqa: F811
    cfg = OmegaConf.merge(
        OmegaConf.load("configs/app.yaml"),
        {
            "checkpoint": checkpoints["checkpoint"],
            "classifier_checkpoint": checkpoints["classifier_checkpoint"],
            "output_dir": str(tmp_path / "app"),
            "examples": 2,
            **values,
        },
    )
    return cfg


@pytest.fixture(scope="module")
def explorer(checkpoints, tmp_path_factory) -> Explorer:  # noqa: F811
    return Explorer(config(checkpoints, tmp_path_factory.mktemp("explorer")))


def test_uploads_read_as_the_scripts_read_them_and_bad_ones_say_why(explorer, tmp_path):
    film = tmp_path / "film16.png"
    write(film, encode(gray(90, 70, seed=1).astype(np.uint16) * 257))
    assert explorer.read(film).shape == (1, 1, 64, 64)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png cannot be read"):
        explorer.read(tmp_path / "notes.png")
    good = encode(gray(64, 64, seed=2))
    write(tmp_path / "cut.png", good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.png cannot be read"):
        explorer.read(tmp_path / "cut.png")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (explorer.cfg.max_upload_mb * 2**20 + 1))
    with pytest.raises(ValueError, match="the limit is 50 MB"):
        explorer.read(big)


def test_a_counterfactual_is_the_attribution_runs_and_induction_checks_its_region(explorer, tmp_path):
    image = explorer.read(explorer.examples(tmp_path / "examples", 2)[0].path)
    first = explorer.counterfactual(image, **SETTINGS)
    again = explorer.counterfactual(image, **SETTINGS)
    assert np.array_equal(first.map, again.map) and first.map.shape == (64, 64) and first.map.min() >= 0
    assert 0 <= first.p_before <= 1 and 0 <= first.p_after <= 1
    with pytest.raises(ValueError, match="box"):
        explorer.induce(image, "nodule", None, "50,50,90,90", None, 3.0, 2, 0)  # outside the 64 px input
    with pytest.raises(ValueError, match="needs a lung mask"):
        explorer.induce(image, "nodule", "left-lower", None, None, 3.0, 2, 0)  # an upload has no lung mask
    induced = explorer.induce(image, "effusion", "right-lower", "10,30,30,50", None, 3.0, 2, 0)  # zone: wording
    assert induced.region.sum() == 400 and "effusion" in induced.prompt
    assert np.array_equal(induced.induced01[~induced.region], induced.image01[~induced.region])  # pasted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_page_in_chromium_serves_a_counterfactual_and_refuses_a_broken_file(checkpoints, tmp_path):  # noqa: F811
    cfg = config(checkpoints, tmp_path, port=free_port())
    page_app, explorer = app.serve(cfg, block=False)
    film = tmp_path / "film.png"
    write(film, encode(gray(80, 80, seed=3)))
    try:
        with browser.browser_page(f"http://127.0.0.1:{cfg.port}") as page:
            browser.upload(page, film)
            seconds = browser.counterfactual(page)  # the page's defaults: sdedit, attribution.yaml's block, seed 0
            print(f"counterfactual request to panels shown: {seconds:.1f} s (smoke model)")
            downloaded = np.load(browser.download(page, "map.npy", tmp_path))
            defaults = explorer.defaults("sdedit")
            expected = explorer.counterfactual(
                explorer.read(film),
                "sdedit",
                defaults["amount"],
                defaults["guidance_scale"],
                defaults["num_inference_steps"],
                0,
            ).map
            np.testing.assert_array_equal(downloaded, expected)

            (tmp_path / "notes.png").write_text("not an image")
            browser.upload(page, tmp_path / "notes.png")
            page.click("#run-counterfactual")
            page.get_by_text("notes.png cannot be read").first.wait_for(state="visible")

            browser.upload(page, film)  # the server goes on serving
            page.click("#run-counterfactual")
            page.get_by_text("p(abnormal)").first.wait_for(state="visible")

            page.get_by_role("tab", name="Induction").click()  # an example phantom, its lung zone, the bank's prompt
            assert page.get_by_label("prompt").input_value() == explorer.prompt_for("nodule", "left-lower", None)
            page.click("#run-induction")
            page.get_by_text("classifier p(nodule)").first.wait_for(state="visible")
            picture = page.locator("#box-picker img").first  # two clicks on the picture draw a box
            size = picture.bounding_box()
            picture.click(position={"x": size["width"] * 0.25, "y": size["height"] * 0.25})
            page.wait_for_timeout(500)
            picture.click(position={"x": size["width"] * 0.5, "y": size["height"] * 0.6})
            page.wait_for_function("document.querySelector('#box textarea, #box input').value.split(',').length == 4")
            x0, y0, x1, y1 = map(int, page.locator("#box textarea, #box input").first.input_value().split(","))
            assert abs(x0 - 16) <= 1 and abs(y0 - 16) <= 1 and abs(x1 - 33) <= 1 and abs(y1 - 39) <= 1
            page.get_by_label("or a box").fill("10,10,90,90")
            page.click("#run-induction")
            page.get_by_text("outside the 64x64 image").first.wait_for(state="visible")
    finally:
        page_app.close()
    time.sleep(0.1)
    assert torch.is_tensor(explorer.read(film))

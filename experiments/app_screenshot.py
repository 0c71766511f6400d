"""After `make demo`: the app on the demo model, one counterfactual request timed in headless Chromium from the click
to the three panels shown (the first request, then `repeats` more on fresh pages), and the README's screenshot.

    make app-shot            # -> docs/app.png, outputs/app_shot/latency.json

Run it alone on the machine: it times.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments import app
from lightning_modules.app import browser
from lightning_modules.runs.cli import load_config, run


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config("app", ["output_dir=outputs/app_shot", *argv])
    app.check(cfg)
    repeats = 3
    page_app, explorer = app.serve(cfg, block=False)
    example = next(e for e in explorer.examples(Path(cfg.output_dir) / "examples", cfg.examples) if e.abnormal)
    seconds = []
    try:
        for k in range(1 + repeats):
            with browser.browser_page(f"http://{cfg.host}:{cfg.port}") as page:
                browser.upload(page, example.path)
                seconds.append(browser.counterfactual(page))
                if k == 0:
                    page.wait_for_timeout(500)
                    Path("docs").mkdir(exist_ok=True)
                    page.screenshot(path="docs/app.png", full_page=True)
    finally:
        page_app.close()
    result = {
        "checkpoint": cfg.checkpoint,
        "example": example.name,
        "settings": {"method": "sdedit", **explorer.defaults("sdedit"), "seed": 0},
        "first_request_seconds": seconds[0],
        "later_requests_seconds": seconds[1:],
        "median_later_seconds": statistics.median(seconds[1:]),
        "measured": "click on the page to the three panels shown, headless Chromium on this machine",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out = Path(cfg.output_dir) / "latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"one counterfactual request on {cfg.checkpoint}: first {seconds[0]:.2f} s, then median "
        f"{result['median_later_seconds']:.2f} s of {repeats} -> {out}, docs/app.png"
    )
    return result


if __name__ == "__main__":
    run(main)

"""The web app: a model explored one image at a time in the browser (Gradio), served on this machine.

    make app                                   # the `make demo` checkpoints, http://127.0.0.1:7860
    python experiments/app.py checkpoint=logs/ldm/checkpoints/best.ckpt port=8000

The model loads once; requests queue and run one at a time. The page: ``lightning_modules/app/ui.py``; what it asks of
the model: ``lightning_modules/app/service.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from lightning_modules.runs.cli import load_config, run

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: this machine may have no internet


def check(cfg: DictConfig) -> None:
    if not Path(cfg.checkpoint).is_file():
        raise SystemExit(f"app: no checkpoint at {cfg.checkpoint}: run `make demo` first, or give CHECKPOINT=...")
    if not 0 < int(cfg.port) < 65536 or cfg.max_upload_mb <= 0 or cfg.examples < 2:
        raise SystemExit("app: port must be in 1..65535, max_upload_mb positive and examples at least 2")


def serve(cfg: DictConfig, block: bool = True):
    """Load the model, write the examples, start the server; returns the Gradio app (``block=False``: at once)."""
    import gradio as gr

    from lightning_modules.app.service import Explorer
    from lightning_modules.app.ui import build

    out = Path(cfg.output_dir)
    explorer = Explorer(cfg)
    examples = explorer.examples(out / "examples", cfg.examples)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    page = build(explorer, examples, out / "requests")
    page.queue(default_concurrency_limit=1)  # one model on one device: one request at a time, the rest wait
    page.launch(
        server_name=cfg.host,
        server_port=int(cfg.port),
        max_file_size=f"{cfg.max_upload_mb}mb",
        allowed_paths=[str(out.resolve())],
        prevent_thread_lock=not block,
        quiet=not block,
        footer_links=[],
        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"]),  # no web fonts to fetch
    )
    return page, explorer


def main(argv: list[str] | None = None):
    cfg = load_config("app", argv)
    check(cfg)
    return serve(cfg)


if __name__ == "__main__":
    run(main)

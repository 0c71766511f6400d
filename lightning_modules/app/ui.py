"""The web app's page (Gradio): a Counterfactual tab and an Induction tab over one ``Explorer``. Requests are queued
and run one at a time (one model, one device); a denoising step counter shows while one runs; a request that cannot
be served answers with one line in the page (``gr.Error``) and the server keeps serving."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageFont

from datamodules.base import to_unit_range
from lightning_modules.app.service import METHODS, Example, Explorer
from lightning_modules.overlays import TILE, blend_heat, colour_bar, diverging, grey, save_array, save_gray_png, tint
from lightning_modules.regions import ZONES, box_mask

MAP_LABEL = "denser than healthy (grey)"


# 1. pictures ----------------------------------------------------------------------------------------------------------
def enlarge(image01: np.ndarray) -> Image.Image:
    """(H, W) grey or (H, W, 3) in [0, 1] -> an RGB picture at least ``TILE`` px (nearest: pixels stay pixels)."""
    rgb = image01 if image01.ndim == 3 else grey(image01)
    side = max(TILE, image01.shape[0])
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)


def overlay_with_bar(image01: np.ndarray, heat: np.ndarray, vmax: float | None, cmap: str) -> Image.Image:
    """The map over the input with its colour bar (``vmax`` None: the map's own maximum)."""
    top = float(heat.max()) if vmax is None else float(vmax)
    top = top if top > 0 else 1.0
    picture = enlarge(blend_heat(image01, heat, top, cmap))
    bar = colour_bar(picture.height, top, MAP_LABEL, cmap, ImageFont.load_default(size=12))
    panel = Image.new("RGB", (picture.width + bar.width + 6, picture.height), "white")
    panel.paste(picture, (0, 0))
    panel.paste(bar, (picture.width + 6, 0))
    return panel


def signed_picture(difference: np.ndarray) -> Image.Image:
    """induced - original in a diverging colour map, symmetric about 0."""
    return enlarge(diverging(difference, float(np.abs(difference).max()) or 1.0))


def tinted(image01: np.ndarray, region: np.ndarray) -> Image.Image:
    """The image with ``region`` (H, W) bool tinted red."""
    return enlarge(tint(image01, region.astype(image01.dtype), alpha=0.4))


def probability(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def answered(handler: Callable) -> Callable:
    """An error the user can cause (a bad file, region or setting) as one line in the page, not a server error."""

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ValueError, LookupError, OSError) as err:
            raise gr.Error(" ".join(str(err).split()), print_exception=False) from None

    return run


def mkdirs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# 2. progress: the UNet's calls counted while a request runs -----------------------------------------------------------
class StepCounter:
    """A forward hook on the UNet that reports "denoising step k / n" to Gradio's progress bar."""

    def __init__(self, unet: torch.nn.Module, total: int, report: Callable):
        self.unet, self.total, self.report, self.count = unet, max(1, total), report, 0

    def __enter__(self) -> StepCounter:
        self.handle = self.unet.register_forward_hook(self._step)
        self.report((0, self.total), desc="denoising step", unit="steps")
        return self

    def _step(self, *args) -> None:
        self.count += 1
        self.report((min(self.count, self.total), self.total), desc="denoising step", unit="steps")

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def expected_steps(method: str, amount: float, steps: int) -> int:
    """UNet calls of one request: sdedit denoises ``strength`` of the steps; inversion inverts then denoises its
    depth; induction (``method`` "induce") every step."""
    part = min(int(steps * amount), steps)
    return {"sdedit": part, "inversion": 2 * part}.get(method, steps)


# 3. the page --------------------------------------------------------------------------------------------------------
def build(explorer: Explorer, examples: list[Example], out: Path) -> gr.Blocks:
    """The two tabs; ``out``: where each request's downloads are written (a folder per request)."""
    by_name = {e.name: e for e in examples}
    cfg = explorer.cfg

    def source(upload: str | None, example: str | None) -> tuple[torch.Tensor, Example | None]:
        if upload:
            return explorer.read(upload), None
        if example:
            return explorer.read(by_name[example].path), by_name[example]
        raise ValueError("upload an X-ray or pick an example first")

    @answered
    def run_counterfactual(upload, example, method, amount, guidance, steps, seed, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its tracker)
        image, _ = source(upload, example)
        with StepCounter(explorer.pipeline.unet, expected_steps(method, amount, int(steps)), progress):
            result = explorer.counterfactual(image, method, amount, guidance, int(steps), int(seed))
        shutil.rmtree(out, ignore_errors=True)  # the previous request's downloads: the folder does not grow
        folder = Path(tempfile.mkdtemp(dir=mkdirs(out)))
        overlay = overlay_with_bar(result.image01, result.map, cfg.vmax, cfg.cmap)
        files = [
            save_gray_png(folder / "counterfactual.png", result.counterfactual01),
            save_array(folder / "map.npy", result.map),
            folder / "map.png",
        ]
        overlay.save(files[2])
        scores = (
            f"classifier p(abnormal): input **{probability(result.p_before)}**, "
            f"counterfactual **{probability(result.p_after)}**"
        )
        return enlarge(result.image01), enlarge(result.counterfactual01), overlay, scores, [str(f) for f in files]

    @answered
    def run_induction(upload, example, finding, zone, box, prompt, guidance, steps, seed, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its tracker)
        image, chosen = source(upload, example)
        lung = chosen.lung_mask if chosen is not None else None
        zone = None if zone == "none" else zone
        with StepCounter(explorer.pipeline.unet, expected_steps("induce", 1.0, int(steps)), progress):
            result = explorer.induce(image, finding, zone, box, prompt, guidance, int(steps), int(seed), lung)
        scores = (
            f"prompt: *{result.prompt}*  \nclassifier p({finding}): before **{probability(result.p_before)}**, "
            f"after **{probability(result.p_after)}**"
        )
        difference = signed_picture(result.induced01 - result.image01)
        return tinted(result.image01, result.region), enlarge(result.induced01), difference, scores

    def show_picker(upload, example):
        """The chosen normal image, to click a box's corners on."""
        try:
            image, _ = source(upload, example)
        except (ValueError, LookupError, OSError):
            return None, None
        return enlarge(to_unit_range(image)[0, 0].numpy()), None

    @answered
    def pick(upload, example, first, evt: gr.SelectData):
        """A click on the picture: the first corner, then the second, which writes the box (model pixels)."""
        image01 = to_unit_range(source(upload, example)[0])[0, 0].numpy()
        scale = explorer.size / max(TILE, explorer.size)  # the picture is enlarged to TILE px
        x, y = (min(explorer.size - 1, int(v * scale)) for v in evt.index[:2])
        if first is None:
            return tinted(image01, box_mask((x, y, x + 1, y + 1), explorer.size)), (x, y), gr.update()
        (x0, x1), (y0, y1) = sorted((first[0], x)), sorted((first[1], y))
        box = (x0, y0, x1 + 1, y1 + 1)
        return tinted(image01, box_mask(box, explorer.size)), None, ",".join(map(str, box))

    def wording(finding, zone, box):
        try:
            return explorer.prompt_for(finding, None if zone == "none" else zone, box or None)
        except ValueError:
            return ""

    def method_defaults(method):
        values = explorer.defaults(method)
        return (
            gr.update(value=values["amount"], label=METHODS[method]),
            values["guidance_scale"],
            values["num_inference_steps"],
        )

    start = explorer.defaults("sdedit")
    abnormal = [e.name for e in examples if e.abnormal]
    normal = [e.name for e in examples if not e.abnormal]
    # Gradio's copies of results older than an hour are deleted every hour: a long-running app's disk does not grow
    with gr.Blocks(title="VALD: healthy counterfactuals and attribution maps", delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "## VALD: healthy counterfactuals and attribution maps\n"
            f"Model `{cfg.checkpoint}`, {explorer.size} px; classifier "
            f"`{cfg.classifier_checkpoint if explorer.classifier is not None else 'none'}`."
        )
        with gr.Tab("Counterfactual"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="X-ray: PNG, JPEG (8 or 16 bit) or DICOM", type="filepath", elem_id="upload")
                    example = gr.Dropdown(abnormal + normal, value=None, label="or an example phantom")
                    method = gr.Radio(list(METHODS), value="sdedit", label="method")
                    amount = gr.Slider(0.02, 1.0, value=start["amount"], step=0.01, label="strength")
                    guidance = gr.Slider(0.0, 30.0, value=start["guidance_scale"], step=0.5, label="guidance")
                    steps = gr.Slider(2, 200, value=start["num_inference_steps"], step=1, label="steps")
                    seed = gr.Number(0, precision=0, label="seed")
                    go = gr.Button("Make the healthy counterfactual", variant="primary", elem_id="run-counterfactual")
                with gr.Column(scale=3):
                    with gr.Row():
                        shown_input = gr.Image(label="input", type="pil", elem_id="panel-input")
                        shown_cf = gr.Image(label="healthy counterfactual", type="pil", elem_id="panel-counterfactual")
                        shown_map = gr.Image(label="attribution", type="pil", elem_id="panel-attribution")
                    scores = gr.Markdown(elem_id="counterfactual-scores")
                    downloads = gr.File(label="downloads", file_count="multiple", elem_id="downloads")
            method.change(method_defaults, method, [amount, guidance, steps])
            go.click(
                run_counterfactual,
                [upload, example, method, amount, guidance, steps, seed],
                [shown_input, shown_cf, shown_map, scores, downloads],
                concurrency_id="model",  # both tabs share one queue: one request on the model at a time
                concurrency_limit=1,
            )
        with gr.Tab("Induction"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload_n = gr.File(label="a normal X-ray", type="filepath", elem_id="upload-normal")
                    example_n = gr.Dropdown(normal, value=normal[0] if normal else None, label="or an example phantom")
                    finding = gr.Dropdown(explorer.findings, value=explorer.findings[0], label="finding")
                    zone = gr.Dropdown(["none", *ZONES], value="left-lower", label="lung zone (phantoms only)")
                    box = gr.Textbox(
                        label="or a box x0,y0,x1,y1 in pixels of the model's input (wins over the zone)",
                        elem_id="box",
                    )
                    prompt = gr.Textbox(value=wording(explorer.findings[0], "left-lower", None), label="prompt")
                    guidance_n = gr.Slider(0.0, 30.0, value=explorer.induction_guidance, step=0.5, label="guidance")
                    steps_n = gr.Slider(2, 200, value=explorer.induction_steps, step=1, label="steps")
                    seed_n = gr.Number(0, precision=0, label="seed")
                    go_n = gr.Button("Induce the finding", variant="primary", elem_id="run-induction")
                with gr.Column(scale=3):
                    picker = gr.Image(
                        show_picker(None, normal[0] if normal else None)[0],
                        label="click two corners to draw the box",
                        type="pil",
                        interactive=False,
                        elem_id="box-picker",
                    )
                    corner = gr.State(None)
                    with gr.Row():
                        region_shown = gr.Image(label="original, region in red", type="pil")
                        induced_shown = gr.Image(label="induced", type="pil")
                        difference_shown = gr.Image(label="induced - original", type="pil")
                    scores_n = gr.Markdown()
            for control in (finding, zone, box):
                control.change(wording, [finding, zone, box], prompt)
            for control in (upload_n, example_n):
                control.change(show_picker, [upload_n, example_n], [picker, corner])
            picker.select(pick, [upload_n, example_n, corner], [picker, corner, box])
            go_n.click(
                run_induction,
                [upload_n, example_n, finding, zone, box, prompt, guidance_n, steps_n, seed_n],
                [region_shown, induced_shown, difference_shown, scores_n],
                concurrency_id="model",
                concurrency_limit=1,
            )
    return page

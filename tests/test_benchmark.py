"""experiments/benchmark.py --quick as `make bench` runs it, shrunk: what it writes is consistent with what it timed
(every ratio recomputed from the recorded seconds), ours and diffusers' img2img agree, and bad settings stop it
before anything is measured. The timing harness is checked on fake calls."""

from __future__ import annotations

import json
import math
import resource

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from configs import compose, instantiate
from experiments import benchmark as script
from lightning_modules.runs import benchmark
from lightning_modules.runs.timing import Line, measure

LINES = (
    "train_plain",
    "train_ours_caches_off",
    "train_ours_caches_on",
    "sdedit_diffusers",
    "sdedit_diffusers_given_embeddings",
    "sdedit_ours",
    "inversion_ours",
    "unet_forward_backward",
    "unet_channels_last",
    "unet_bf16_autocast",
    "matmul_peak",
    "latents_from_files",
    "latents_from_store",
    "prompts_template",
    "prompts_free_text",
)
KEYS = {
    "train_speedup_vs_plain",
    "train_speedup_vs_plain_eager",
    "train_speedup_caches_on_vs_off",
    "sdedit_speedup_vs_diffusers",
    "sdedit_speedup_vs_diffusers_eager",
    "sdedit_speedup_vs_diffusers_given_embeddings",
    "ours",
    "compile",
    "unet_peak_fraction",
    "unet_variant_speedups",
    "matmul_peak_flops",
    "lines",
    "checks",
    "memory_method",
    "environment",
    "settings",
    "counterfactual_settings",
    "quick",
    "latent_store",
    "attribution_scaling",
    "prompt_cache",
}
LINE_KEYS = {
    "what",
    "unit",
    "median",
    "q1",
    "q3",
    "min",
    "max",
    "repeats",
    "seconds",
    "items_per_repeat",
    "peak_memory_mb",
    "first_call_seconds",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    returned = script.main(["--quick", f"output_dir={out}"])
    return returned, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def median_rate(line: dict) -> float:
    """A line's median images (FLOPs) per second, recomputed from its recorded seconds."""
    return float(np.median(line["items_per_repeat"] / np.asarray(line["seconds"])))


def test_what_is_written_is_what_was_measured(quick):
    returned, result, _ = quick
    assert result == json.loads(json.dumps(returned))
    assert set(result) == KEYS and set(result["lines"]) == set(LINES)  # --quick does not compile: no compiled lines
    repeats = result["settings"]["repeats"]
    for name, line in result["lines"].items():
        assert set(line) == LINE_KEYS and line["repeats"] == len(line["seconds"]) == repeats, name
        rates = line["items_per_repeat"] / np.asarray(line["seconds"])
        assert np.all(rates > 0) and np.all(np.isfinite(rates)), name
        q1, q3 = np.percentile(rates, [25, 75])
        assert np.allclose(
            [line["min"], line["q1"], line["median"], line["q3"], line["max"]],
            [rates.min(), q1, np.median(rates), q3, rates.max()],
        ), name
        assert line["first_call_seconds"] > 0, name
    assert result["lines"]["matmul_peak"]["items_per_repeat"] == 2 * result["settings"]["matmul_size"] ** 3


def test_every_ratio_is_recomputed_from_the_recorded_seconds(quick):
    _, result, _ = quick
    lines = result["lines"]
    rate = {name: median_rate(line) for name, line in lines.items()}
    assert result["ours"] == {"train": "train_ours_caches_on", "sdedit": "sdedit_ours"} and result["compile"] is None
    expected = {
        "train_speedup_vs_plain": rate["train_ours_caches_on"] / rate["train_plain"],
        "train_speedup_vs_plain_eager": rate["train_ours_caches_on"] / rate["train_plain"],
        "train_speedup_caches_on_vs_off": rate["train_ours_caches_on"] / rate["train_ours_caches_off"],
        "sdedit_speedup_vs_diffusers": rate["sdedit_ours"] / rate["sdedit_diffusers"],
        "sdedit_speedup_vs_diffusers_eager": rate["sdedit_ours"] / rate["sdedit_diffusers"],
        "sdedit_speedup_vs_diffusers_given_embeddings": rate["sdedit_ours"] / rate["sdedit_diffusers_given_embeddings"],
    }
    for key, value in expected.items():
        assert math.isclose(result[key], value, rel_tol=1e-9), key
    peak = max(lines["matmul_peak"]["items_per_repeat"] / s for s in lines["matmul_peak"]["seconds"])
    assert math.isclose(result["matmul_peak_flops"], peak, rel_tol=1e-9)
    assert math.isclose(result["unet_peak_fraction"], rate["unet_forward_backward"] / peak, rel_tol=1e-9)
    assert set(result["unet_variant_speedups"]) == {"channels_last", "bf16_autocast"}
    for variant, speedup in result["unet_variant_speedups"].items():
        assert math.isclose(speedup, rate[f"unet_{variant}"] / rate["unet_forward_backward"], rel_tol=1e-9)
    store = rate["latents_from_store"] / rate["latents_from_files"]
    assert math.isclose(result["latent_store"]["speedup_vs_files"], store, rel_tol=1e-9)


def test_the_store_memory_lines_are_growths_per_image_and_their_projection(quick):
    _, result, markdown = quick
    memory = result["latent_store"]["memory"]
    counts, grown = memory["counts"], memory["anonymous_bytes"]
    for kind in ("cache", "store"):
        per_image = (grown[kind][1] - grown[kind][0]) / (counts[1] - counts[0])
        assert math.isclose(memory["bytes_per_image"][kind], per_image)
        assert math.isclose(memory["projected_chexpert_bytes"][kind], per_image * 224_316)
    latent_bytes = 2 * 4 * math.prod(memory["latent_shape"])  # mean and std, float32
    # the cache holds every latent in the rank's memory, the store an index entry; RssAnon growth is noisy (the heap
    # reuses what earlier lines freed), so the test asks for the difference, not the exact sizes
    assert memory["bytes_per_image"]["cache"] > latent_bytes / 2 > 4 * memory["bytes_per_image"]["store"]
    assert "latent store / from 256 px PNG files" in markdown


def test_ours_agrees_with_diffusers_img2img_within_the_tolerance(quick):
    _, result, _ = quick
    tolerance = result["settings"]["counterfactual"]
    assert set(result["checks"]) == {"sdedit_max_abs_difference"}
    assert 0 <= result["checks"]["sdedit_max_abs_difference"] <= tolerance["atol"] + tolerance["rtol"]


def test_peak_memory_is_a_growth_within_the_process_peak(quick):
    _, result, _ = quick
    assert result["memory_method"] == "peak RSS growth (/proc/self/statm)"  # the CPU: the tests run there
    process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    for name, line in result["lines"].items():
        assert 0 <= line["peak_memory_mb"] <= process_peak_mb, name


def test_the_counterfactual_settings_are_attribution_yamls(quick):
    """configs/attribution.yaml holds the values; the benchmark overrides only what --quick shortens."""
    _, result, _ = quick
    attribution, settings = compose("attribution"), result["counterfactual_settings"]
    assert settings["sdedit"] == {
        "strength": attribution.sdedit.strength,
        "num_inference_steps": 10,
        "guidance_scale": attribution.sdedit.guidance_scale,
    }
    assert settings["inversion"] == {
        "inversion_depth": attribution.inversion.inversion_depth,
        "num_inference_steps": 2,
        "guidance_scale": attribution.inversion.guidance_scale,
    }


def test_the_markdown_lists_every_line_and_ratio(quick):
    _, result, table = quick
    for name in LINES:
        assert f"| {name} | {result['lines'][name]['what']} |" in table, name
    assert f"**{result['train_speedup_vs_plain']:.2f}x**" in table
    assert f"**{result['sdedit_speedup_vs_diffusers']:.2f}x**" in table
    assert f"**{result['unet_peak_fraction']:.1%}**" in table
    assert result["environment"]["num_threads"] == 1 and result["quick"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet_variants=[fp8]", "benchmark: unknown unet_variants \\['fp8'\\]; valid: channels_last"),
        ("counterfactual.sdedit.strength=2.0", "benchmark: strength must be in \\(0, 1\\]"),
        ("repeats=0", "benchmark: warmup and repeats must be >= 1"),
    ],
)
def test_bad_settings_stop_before_measuring(tmp_path, override, message):
    with pytest.raises(SystemExit, match=message):
        script.main(["--quick", f"output_dir={tmp_path}", override])
    assert not (tmp_path / "bench.json").exists()


def test_the_module_is_built_as_training_builds_it(tmp_path):
    cfg = compose("benchmark", benchmark.QUICK)
    datamodule = instantiate(cfg.data)
    bench = benchmark.Bench(cfg, torch.device("cpu"), benchmark.random_vae(cfg, str(tmp_path)), datamodule)
    module = bench.module(caches=False)
    assert module.hparams.cache_latents is False and module.hparams.prompt_encoder["cache"] is False
    assert module.hparams.unet == OmegaConf.to_container(cfg.model.unet)
    assert module.hparams.image_size == datamodule.image_size
    assert module.hparams.sampling["normal_prompt"] == datamodule.normal_prompt
    again = bench.module(caches=True)  # seeded: every line times the same weights
    assert all(torch.equal(a, b) for a, b in zip(module.unet.parameters(), again.unet.parameters(), strict=True))


def test_measure_interleaves_the_rounds_after_the_warm_up():
    order = []

    def fake(name: str, seconds: float):
        def call(memory=None) -> float:
            order.append(name)
            return seconds

        return call

    measured = measure(
        {"a": fake("a", 1.0), "b": fake("b", 2.0)}, torch.device("cpu"), warmup=2, repeats=4, memory_interval=0.001
    )
    assert order == ["a", "a", "b", "b"] + ["a", "b", "b", "a"] * 2  # reversed every other round: the same drift
    assert measured["a"].seconds == [1.0] * 4 and measured["b"].seconds == [2.0] * 4
    assert all(m.peak_memory_bytes >= 0 and m.first_call_seconds >= 0 for m in measured.values())
    with pytest.raises(ValueError, match="warmup and repeats must be >= 1"):
        measure({"a": fake("a", 1.0)}, torch.device("cpu"), warmup=0)


def test_a_line_summarises_rates_not_seconds():
    line = Line("x", "", seconds=[1.0, 2.0, 4.0], items=8, peak_memory_bytes=2**21, first_call_seconds=5.0)
    summary = line.summary()  # rates 8, 4, 2 images/s
    assert (summary["min"], summary["q1"], summary["median"], summary["q3"], summary["max"]) == (2, 3, 4, 6, 8)
    assert summary["peak_memory_mb"] == 2.0 and summary["repeats"] == 3


def test_compile_cost_is_the_first_call_difference_over_the_time_each_call_saves():
    eager = Line("eager", "", seconds=[1.0, 1.0, 1.0], items=64, peak_memory_bytes=0, first_call_seconds=3.0)
    compiled = Line("compiled", "", [0.5, 0.5, 0.5], 64, 0, first_call_seconds=13.0)
    assert benchmark.compile_cost(eager, compiled) == {"seconds": 10.0, "items_per_call": 64, "break_even_calls": 20.0}
    three_steps = [
        Line(name, "", [3 * t] * 3, 3 * 64, 0, first_call_seconds=first)
        for name, t, first in (("eager", 1.0, 3.0), ("compiled", 0.5, 13.0))
    ]
    assert benchmark.compile_cost(*three_steps, calls_per_repeat=3) == {
        "seconds": 10.0,
        "items_per_call": 64,
        "break_even_calls": 20.0,
    }
    slower = Line("slower", "", [2.0, 2.0, 2.0], 64, 0, first_call_seconds=13.0)
    assert benchmark.compile_cost(eager, slower)["break_even_calls"] is None
    note = benchmark.compile_notes(
        {
            "train_steps": benchmark.compile_cost(eager, compiled),
            "sdedit_calls": benchmark.compile_cost(eager, slower),
            "timed": "cold",
        }
    )
    assert note == [
        "- compilation, timed cold, once per process and input shape: training 10 s, repaid after 20 "
        "steps of 64 images; sdedit 10 s, never repaid (not faster)"
    ]


def test_attribution_scaling_is_two_timed_runs_of_the_users_command(quick):
    """1 and 2 processes on the same folder: the speedup and efficiency recomputed from the recorded seconds."""
    _, result, markdown = quick
    scaling = result["attribution_scaling"]
    one, two = scaling["processes"]["1"], scaling["processes"]["2"]
    for run in (one, two):
        assert run["seconds"] > 0 and run["images_per_second"] == pytest.approx(scaling["images"] / run["seconds"])
    assert scaling["speedup_2_vs_1"] == pytest.approx(one["seconds"] / two["seconds"])
    assert scaling["efficiency"] == pytest.approx(scaling["speedup_2_vs_1"] / 2)
    assert f"**{scaling['speedup_2_vs_1']:.2f}x**, scaling efficiency" in markdown


def test_the_prompt_cache_stays_bounded_with_free_text_and_its_rates_are_measured(quick):
    _, result, markdown = quick
    cache, lines = result["prompt_cache"], result["lines"]
    assert cache["entries_after"] == cache["cache_size"]  # more reports than it may hold: the oldest went
    assert cache["cache_bytes"] == cache["entries_after"] * cache["bytes_per_entry"]
    assert cache["free_text_vs_template"] == pytest.approx(
        lines["prompts_free_text"]["median"] / lines["prompts_template"]["median"]
    )
    assert cache["free_text_vs_template"] < 1  # an encoder pass costs more than a lookup
    assert "prompt embeddings: free-text reports seen once" in markdown


def test_the_reference_times_the_training_unet_step_and_the_matmul_peak(tmp_path):
    """`--reference` (the demo's first step): the configured UNet's forward + backward at the training batch, and
    the matmul peak, written where the demo's report reads them."""
    returned = script.main(["--quick", "--reference", "data.batch_size=4", f"output_dir={tmp_path}"])
    written = json.loads((tmp_path / "reference.json").read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["unet_step"].startswith("UNet forward + backward at batch 4, ")
    assert 0 < written["unet_step_seconds"] < 60 and written["repeats"] == 3  # --quick: 3 repeats
    assert written["matmul_peak_flops"] > 1e6 and written["environment"]["num_threads"] == 1
    assert "median of 3" in (tmp_path / "reference.md").read_text()

"""experiments/benchmark.py --quick as `make bench` runs it, shrunk: valid JSON with every line and ratio measured."""

from __future__ import annotations

import json
import math

import pytest

from experiments import benchmark

RATIOS = ("train_speedup_vs_plain", "sdedit_speedup_vs_diffusers", "unet_peak_fraction")
LINES = ("train_plain", "train_ours_caches_off", "train_ours_caches_on", "sdedit_diffusers",
         "sdedit_diffusers_given_embeddings", "sdedit_ours", "inversion_ours", "unet_forward_backward",
         "unet_channels_last", "unet_bf16_autocast", "matmul_peak")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_every_line_and_ratio(tmp_path):
    returned = benchmark.main(["--quick", f"output_dir={tmp_path}"])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result == json.loads(json.dumps(returned))  # what was written is what was measured

    assert all(positive(result[key]) for key in RATIOS), {key: result[key] for key in RATIOS}
    assert 0 < result["unet_peak_fraction"] < 1.5  # a fraction of a peak measured on the same machine
    assert set(result["lines"]) == set(LINES)
    repeats = result["settings"]["repeats"]
    for name, line in result["lines"].items():
        assert len(line["seconds"]) == repeats and all(positive(s) for s in line["seconds"]), name
        assert line["min"] <= line["q1"] <= line["median"] <= line["q3"] <= line["max"], name
        assert positive(line["median"]), name
    for name in LINES:
        assert isinstance(result["lines"][name]["peak_memory_mb"], (int, float)), name
    # the speedups are the ratios of the lines' medians, not numbers written down elsewhere
    lines = result["lines"]
    assert math.isclose(result["train_speedup_vs_plain"],
                        lines["train_ours_caches_on"]["median"] / lines["train_plain"]["median"])
    assert math.isclose(result["sdedit_speedup_vs_diffusers"],
                        lines["sdedit_ours"]["median"] / lines["sdedit_diffusers"]["median"])
    # --quick does not compile: ours is the eager line, and no compilation is reported
    assert result["ours"] == {"train": "train_ours_caches_on", "sdedit": "sdedit_ours"} and result["compile"] is None
    assert result["train_speedup_vs_plain"] == result["train_speedup_vs_plain_eager"]
    assert all(positive(line["first_call_seconds"]) for line in lines.values())
    for variant, speedup in result["unet_variant_speedups"].items():
        assert math.isclose(speedup, lines[f"unet_{variant}"]["median"] / lines["unet_forward_backward"]["median"])
    assert set(result["unet_variant_speedups"]) == {"channels_last", "bf16_autocast"}
    assert result["checks"]["sdedit_max_abs_difference"] <= 1e-4  # ours and diffusers' img2img agree

    env = result["environment"]
    assert env["torch"] and env["num_threads"] >= 1 and result["quick"] is True
    table = (tmp_path / "bench.md").read_text()
    assert "| sdedit_ours |" in table and "unet" in table.lower()


def test_an_unknown_unet_variant_stops_before_measuring(tmp_path):
    with pytest.raises(SystemExit, match="unknown unet_variants \\['fp8'\\]; valid: channels_last"):
        benchmark.main(["--quick", f"output_dir={tmp_path}", "unet_variants=[fp8]"])
    assert not (tmp_path / "bench.json").exists()


def test_compile_cost_is_the_first_call_difference_over_the_time_each_call_saves():
    eager = benchmark.Line("eager", "", seconds=[1.0, 1.0, 1.0], items=64, peak_memory_bytes=0, first_call_seconds=3.0)
    compiled = benchmark.Line("compiled", "", [0.5, 0.5, 0.5], 64, 0, first_call_seconds=13.0)
    assert benchmark.compile_cost(eager, compiled) == {"seconds": 10.0, "items_per_call": 64,
                                                       "break_even_calls": 20.0}
    three_steps = [benchmark.Line(name, "", [3 * t] * 3, 3 * 64, 0, first_call_seconds=first)
                   for name, t, first in (("eager", 1.0, 3.0), ("compiled", 0.5, 13.0))]
    assert benchmark.compile_cost(*three_steps, calls_per_repeat=3) == {"seconds": 10.0, "items_per_call": 64,
                                                                         "break_even_calls": 20.0}
    slower = benchmark.Line("slower", "", [2.0, 2.0, 2.0], 64, 0, first_call_seconds=13.0)
    assert benchmark.compile_cost(eager, slower)["break_even_calls"] is None
    note = benchmark.compile_notes({"train_steps": benchmark.compile_cost(eager, compiled),
                                    "sdedit_calls": benchmark.compile_cost(eager, slower), "timed": "cold"})
    assert note == ["- compilation, timed cold, once per process and input shape: training 10 s, repaid after 20 "
                    "steps of 64 images; sdedit 10 s, never repaid (not faster)"]

"""The prompt-embedding cache when every image has its own report, measured in `make bench`: prompts/s of template
prompts (the bank's few phrasings: cache hits) against free-text reports seen once each (every one a miss), and the
cache's size after more distinct reports than it may hold (``cache_size``: the least recently used go), against
what an unbounded cache would hold for MIMIC-CXR's 227,835 reports."""

from __future__ import annotations

import itertools

import torch

from lightning_modules.runs.timing import Line, stopwatch

#: MIMIC-CXR's report count: where an unbounded cache's size is projected to
MIMIC_REPORTS = 227_835


def prompt_lines(bench) -> tuple[list[Line], dict]:
    cfg = bench.cfg.prompts
    encoder = bench.module(caches=True).prompt_encoder.to(bench.device)
    templates = list(dict.fromkeys(bench.images(cfg.batch_size * 4, bench.cfg.seed).prompts))
    batch = [templates[i % len(templates)] for i in range(cfg.batch_size)]
    counter = itertools.count()

    @torch.no_grad()
    def template_prompts() -> None:
        encoder(batch)

    @torch.no_grad()
    def free_text() -> None:  # each report once: a sentence of its own after the finding
        k = next(counter)
        encoder([f"{p} Compared with study {k}-{i}, no interval change." for i, p in enumerate(batch)])

    calls = {"prompts_template": stopwatch(template_prompts, bench.device)}
    calls["prompts_free_text"] = stopwatch(free_text, bench.device)
    measured = bench.measure(calls)
    with torch.no_grad():
        for k in range(0, encoder.cache_size + cfg.batch_size, cfg.batch_size):  # more reports than it may hold
            encoder([f"report {k + i}: {batch[i % len(batch)]}" for i in range(cfg.batch_size)])
    entry = next(iter(encoder._cache.values()))
    bytes_per_entry = entry.numel() * entry.element_size()
    what = {
        "prompts_template": f"the bank's {len(templates)} phrasings, batches of {cfg.batch_size}: cache hits",
        "prompts_free_text": f"reports seen once each, batches of {cfg.batch_size}: every one encoded",
    }
    lines = [Line.of(name, what[name], m, cfg.batch_size, "prompts/s") for name, m in measured.items()]
    return lines, {
        "cache_size": encoder.cache_size,
        "entries_after": len(encoder._cache),
        "bytes_per_entry": bytes_per_entry,
        "cache_bytes": len(encoder._cache) * bytes_per_entry,
        "unbounded_mimic_bytes": MIMIC_REPORTS * bytes_per_entry,
    }

"""A seed reproduces a training run bit for bit in a fresh process on the same machine (`make repro`'s first check)."""

from __future__ import annotations

import pytest

from configs import compose
from lightning_modules.runs import reproducibility


@pytest.mark.slow
def test_a_seeded_run_in_a_fresh_process_is_bit_identical_and_the_table_says_so():
    cfg = compose("reproducibility", ["steps=3", "num_train=16"])
    cfg.variants = {"baseline": cfg.variants.baseline, "rerun": cfg.variants.rerun}
    rows = reproducibility.compare(cfg)
    assert [row["variant"] for row in rows] == ["baseline", "rerun"]
    assert rows[1]["max_abs_difference"] == 0 and rows[0]["cpu_capability"] == rows[1]["cpu_capability"]
    assert "| rerun | this machine's defaults |" in reproducibility.markdown(rows, cfg)
    assert "0 (bit-identical)" in reproducibility.markdown(rows, cfg)

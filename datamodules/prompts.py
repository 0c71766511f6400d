"""Prompt banks: report-style phrasings per finding, shared by every dataset.

A bank is a YAML file in ``configs/prompts/`` with
    target:   the canonical normal prompt, the default target of a healthy counterfactual
    normal:   phrasings of a normal study
    findings: finding name -> phrasings, optionally with ``{side}`` / ``{zone}`` placeholders
Phrasings that need a location are skipped when none is known (CheXpert labels have none), so one bank serves
localised phantoms and image-level labels alike. Banks stay finite and small, so the frozen text encoder's
embeddings can be cached per prompt.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

PROMPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"
SEPARATOR = "; "  # joins the phrases of a multi-finding report

#: a finding to phrase: its name, or (name, side, zone) with None where unknown
FindingLike = str | Sequence[str | None]


def placeholders(text: str) -> set[str]:
    """Names of the ``{...}`` fields a phrasing needs."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def compose_report(phrases: Sequence[str]) -> str:
    """One report from several finding phrases, in the given order."""
    return SEPARATOR.join(phrases)


def _location(finding: FindingLike) -> tuple[str, dict[str, str]]:
    if isinstance(finding, str):
        return finding, {}
    name, *rest = finding
    return name, {k: v for k, v in zip(("side", "zone"), rest) if v is not None}


def _choose(options: Sequence[str], rng: np.random.Generator | None, choice: int | None) -> str:
    """``options[choice]`` if given, else a draw from ``rng``, else the first: the canonical phrasing."""
    if choice is not None:
        return options[choice % len(options)]
    return options[int(rng.integers(len(options)))] if rng is not None else options[0]


@dataclass(frozen=True)
class PromptBank:
    target: str
    normal: tuple[str, ...]
    findings: Mapping[str, tuple[str, ...]]

    @classmethod
    def load(cls, name: str | Path) -> PromptBank:
        """A bank by name (``configs/prompts/<name>.yaml``) or by path."""
        path = Path(name)
        if path.suffix not in (".yaml", ".yml"):
            path = PROMPT_DIR / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no prompt bank '{name}' ({path}); known banks: {known}")
        raw = yaml.safe_load(path.read_text())
        findings = {k: tuple(v) for k, v in (raw.get("findings") or {}).items()}
        normal = tuple(raw.get("normal") or ())
        target = raw.get("target") or (normal[0] if normal else "")
        if not target or not all(findings.values()):
            raise ValueError(f"{path}: a bank needs a target (or normal phrasings) and >= 1 phrasing per finding")
        return cls(target=target, normal=normal or (target,), findings=findings)

    def phrasings(self, finding: FindingLike) -> tuple[str, ...]:
        """The phrasings of a finding that its known location can fill."""
        name, where = _location(finding)
        if name not in self.findings:
            raise KeyError(f"finding '{name}' not in the bank; known: {', '.join(self.findings)}")
        usable = tuple(p for p in self.findings[name] if placeholders(p) <= where.keys())
        if not usable:
            raise ValueError(f"every phrasing of '{name}' needs a location; got {where or 'none'}")
        return usable

    def phrase(self, finding: FindingLike, rng: np.random.Generator | None = None, choice: int | None = None) -> str:
        """One phrasing of ``finding`` filled with its side/zone; a fixed ``choice`` gives reproducible requests,
        e.g. ``bank.phrase(("nodule", "left", "lower"), choice=0)`` for zero-shot induction."""
        _, where = _location(finding)
        return _choose(self.phrasings(finding), rng, choice).format(**where)

    def normal_phrase(self, rng: np.random.Generator | None = None) -> str:
        """A phrasing of a normal study; the canonical ``target`` without ``rng``."""
        return _choose(self.normal, rng, None) if rng is not None else self.target

    def report(self, findings: Sequence[FindingLike], rng: np.random.Generator | None = None) -> str:
        """The report of an image: each finding phrased with ``rng`` and joined, or a normal phrasing if none."""
        if not findings:
            return self.normal_phrase(rng)
        return compose_report([self.phrase(f, rng) for f in findings])

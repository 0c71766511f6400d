"""Synthetic chest X-ray phantoms as a VALD DataModule: the offline default dataset.

Sample ``i`` of split ``s`` is generated from ``np.random.default_rng([seed, SPLITS.index(s), i])`` (findings, then
the report, then the picture), so any worker, DDP rank or order sees identical samples and the splits are disjoint
by construction. Besides the batch contract of ``datamodules.base`` a batch carries ``healthy`` (the true healthy
counterfactual, (B, 1, H, W) in [-1, 1]), ``lung_mask`` and ``has_mask``.

    python -m datamodules.synthetic --out data/phantoms --split train --limit 200 --contact-sheet sheet.png
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from datamodules.base import CXRDataModule
from datamodules.phantoms import FINDINGS, Finding, Phantom, family, render_phantom, sample_findings
from datamodules.prompts import PromptBank
from datamodules.sampling import SampleKey, sample_key

SPLITS = ("train", "val", "test")
COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
#: class of an abnormal phantom, by its first finding: ground glass is the hallmark of COVID-19 pneumonia, lobar
#: consolidation stands for pneumonia, and nodules and effusions are the non-specific "lung opacity" class
CLASS_OF_FINDING = {
    "ground_glass": "COVID",
    "consolidation": "Viral Pneumonia",
    "nodule": "Lung_Opacity",
    "effusion": "Lung_Opacity",
}
#: where the training sample grids ask for each finding
SAMPLE_LOCATIONS = {
    "nodule": ("left", "middle"),
    "ground_glass": ("right", "lower"),
    "consolidation": ("left", "lower"),
    "effusion": ("right", "lower"),
}


def covid_class(findings: Sequence[Finding]) -> str:
    """COVID-19 Radiography Database class of a phantom: Normal if healthy, else by its first finding."""
    return CLASS_OF_FINDING[findings[0].kind] if findings else "Normal"


def finding_vector(findings: Sequence[Finding]) -> np.ndarray:
    """(K,) float32 over ``FINDINGS``: 1 where present."""
    return np.array([any(f.kind == name for f in findings) for name in FINDINGS], np.float32)


class SyntheticCXRDataset(Dataset):
    """One split of phantoms, generated on the fly (about 1.5 ms each at 64 px), or once with ``cache``: a phantom
    depends only on its index, and a run of many epochs would otherwise spend a fifth of its CPU time drawing the same
    images again (64 KB each at 64 px, 16x that at 256 px)."""

    def __init__(
        self,
        split: str,
        length: int,
        bank: PromptBank,
        image_size: int = 64,
        seed: int = 0,
        p_healthy: float = 0.4,
        p_second: float = 0.25,
        cache: bool = False,
        family_name: str = "standard",
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        family(family_name)  # an unknown family fails here, naming the valid ones
        self.family = family_name
        self.split, self.length, self.bank, self.image_size = split, length, bank, image_size
        self.seed, self.p_healthy, self.p_second = seed, p_healthy, p_second
        self._cache: dict[int, dict] | None = {} if cache else None
        self.pixels = True  # False: prompts, labels and ids only (``without_pixels``)

    def without_pixels(self, stored: set[str]) -> None:
        """Serve prompts, labels and ids only (stage 2 reads its latents from the latent store): nothing rendered."""
        missing = [self.sample_id(i) for i in range(self.length) if self.sample_id(i) not in stored]
        if missing:
            raise ValueError(f"the latent store lacks {len(missing)} phantoms (first: {missing[0]}): write it again")
        self.pixels = False

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.split} split of {self.length}")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i])

    def sample_id(self, i: int) -> str:
        return f"{self.split}-{i:06d}"

    def findings(self, i: int) -> tuple[Finding, ...]:
        """(kind, side, zone) of each finding of sample ``i``; cheap, nothing is rendered."""
        return sample_findings(self._rng(i), self.p_healthy, self.p_second)

    def prompt(self, i: int) -> str:
        rng = self._rng(i)
        return self.bank.report(sample_findings(rng, self.p_healthy, self.p_second), rng)

    def sample(self, i: int) -> tuple[str, Phantom]:
        """Report and phantom (with its healthy twin and one mask per finding) of sample ``i``."""
        rng = self._rng(i)
        findings = sample_findings(rng, self.p_healthy, self.p_second)
        prompt = self.bank.report(findings, rng)
        return prompt, render_phantom(rng, findings, self.image_size, self.family)

    def phantom(self, i: int) -> Phantom:
        return self.sample(i)[1]

    def __getitem__(self, key: int | SampleKey) -> dict:
        i = sample_key(key)[1]  # a phantom is the same in every epoch
        if not self.pixels:
            return {
                "prompt": self.prompt(i),
                "label": torch.from_numpy(finding_vector(self.findings(i))),
                "id": self.sample_id(i),
            }
        if self._cache is None:
            return self._render(i)
        if i not in self._cache:
            self._cache[i] = self._render(i)
        return {key: value.clone() if torch.is_tensor(value) else value for key, value in self._cache[i].items()}

    def _render(self, i: int) -> dict:
        prompt, ph = self.sample(i)
        plane = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))[None]  # (H, W) -> (1, H, W)
        return {
            "image": plane(ph.image) * 2 - 1,
            "healthy": plane(ph.healthy) * 2 - 1,
            "prompt": prompt,
            "label": torch.from_numpy(finding_vector(ph.findings)),
            "mask": plane(ph.mask),
            "lung_mask": plane(ph.lung_mask),
            "has_mask": True,
            "id": self.sample_id(i),
        }


class SyntheticCXRDataModule(CXRDataModule):
    """Phantoms with exact lesion masks, true healthy twins and report-style prompts; needs no data on disk."""

    finding_names = FINDINGS

    def __init__(
        self,
        image_size: int = 64,
        num_train: int = 4000,
        num_val: int = 256,
        num_test: int = 256,
        seed: int = 0,
        p_healthy: float = 0.4,
        p_second: float = 0.25,
        prompt_bank: str = "synthetic",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache: bool = False,
        family: str = "standard",
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        self.image_size, self.seed = image_size, seed
        self.sizes = dict(zip(SPLITS, (num_train, num_val, num_test)))
        self.p_healthy, self.p_second = p_healthy, p_second
        self.bank = PromptBank.load(prompt_bank)
        self.normal_prompt = self.bank.target

    def setup(self, stage: str | None = None) -> None:
        for split, length in self.sizes.items():
            self.datasets.setdefault(
                split,
                SyntheticCXRDataset(
                    split,
                    length,
                    self.bank,
                    self.image_size,
                    self.seed,
                    self.p_healthy,
                    self.p_second,
                    self.hparams.cache,
                    self.hparams.family,
                ),
            )

    def prompt_for(self, kind: str, side: str, zone: str, choice: int = 0) -> str:
        """The prompt asking for one finding at one place, with a fixed phrasing (zero-shot induction)."""
        return self.bank.phrase((kind, side, zone), choice=choice)

    def sample_prompts(self) -> list[str]:
        """The normal prompt, then one located prompt per finding (the training sample grids)."""
        return [self.normal_prompt, *(self.prompt_for(k, *SAMPLE_LOCATIONS[k]) for k in self.finding_names)]

    def prompts(self) -> list[str]:
        """Every distinct prompt of every split plus the normal target: what a text-embedding cache needs."""
        found = {self.normal_prompt}
        for split in SPLITS:
            ds = self.dataset(split)
            found.update(ds.prompt(i) for i in range(len(ds)))
        return sorted(found)

    def write_covid_layout(self, root: str | Path, split: str = "train", limit: int | None = None) -> dict[str, int]:
        """Write ``split`` in the COVID-19 Radiography Database layout; see ``write_covid_layout``."""
        return write_covid_layout(self.dataset(split), root, limit)


def _png(array01: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(np.clip(array01, 0, 1) * 255).astype(np.uint8)).save(path)


def _write_metadata(root: Path, rows: dict[str, list[tuple[str, str, str, str]]]) -> None:
    """``<class>.metadata.xlsx`` with the real sheets' columns; the URL column names the phantom it came from."""
    try:
        from openpyxl import Workbook
    except ImportError:  # the sheets are optional extras of the real dataset too
        return
    for cls, table in rows.items():
        book = Workbook()
        sheet = book.active
        sheet.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
        for row in table:
            sheet.append(list(row))
        book.save(root / f"{cls}.metadata.xlsx")


def write_covid_layout(dataset: SyntheticCXRDataset, root: str | Path, limit: int | None = None) -> dict[str, int]:
    """Write the first ``limit`` phantoms of ``dataset`` exactly as the COVID-19 Radiography Database lies on disk.

    ``<class>/images/<class>-<k>.png`` (8-bit grey), ``<class>/masks/<same>.png`` (LUNG masks, 0/255, as the real
    dataset ships) and ``<class>/lesion_masks/<same>.png`` (the exact lesion masks, which the real one lacks), with
    ``k`` counting from 1 per class in sample order; ``<class>.metadata.xlsx`` when openpyxl is installed; and
    ``README.md.txt``. Class: healthy -> Normal; otherwise by the first finding: ground_glass -> COVID,
    consolidation -> Viral Pneumonia, nodule or effusion -> Lung_Opacity. Returns the count per class.
    """
    root = Path(root)
    for cls in COVID_CLASSES:
        for sub in ("images", "masks", "lesion_masks"):
            (root / cls / sub).mkdir(parents=True, exist_ok=True)
    counts = {cls: 0 for cls in COVID_CLASSES}
    rows: dict[str, list[tuple[str, str, str, str]]] = {cls: [] for cls in COVID_CLASSES}
    size = f"{dataset.image_size}*{dataset.image_size}"
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        ph = dataset.phantom(i)
        cls = covid_class(ph.findings)
        counts[cls] += 1
        stem = f"{cls}-{counts[cls]}"
        _png(ph.image, root / cls / "images" / f"{stem}.png")
        _png(ph.lung_mask, root / cls / "masks" / f"{stem}.png")
        _png(ph.mask, root / cls / "lesion_masks" / f"{stem}.png")
        rows[cls].append((stem, "PNG", size, f"synthetic:{dataset.sample_id(i)}"))
    _write_metadata(root, rows)
    (root / "README.md.txt").write_text(
        "Synthetic chest X-ray phantoms written by VALD (datamodules/synthetic.py) in the layout of the\n"
        "COVID-19 Radiography Database. Nothing here comes from a patient.\n\n"
        f"split: {dataset.split}, family: {dataset.family}, seed: {dataset.seed}, image size: {size}, "
        f"images: {sum(counts.values())}\n"
        f"per class: {json.dumps(counts)}\n\n"
        "Classes: healthy -> Normal; else by the first finding: ground_glass -> COVID,\n"
        "consolidation -> Viral Pneumonia, nodule or effusion -> Lung_Opacity.\n"
        "<class>/masks/ are lung masks, <class>/lesion_masks/ the exact lesion masks (pixels the findings changed).\n"
        "The URL column of <class>.metadata.xlsx names the phantom (split-index) each file came from.\n"
    )
    return counts


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = np.pad(mask, 1)
    inner = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return mask & ~inner


def save_contact_sheet(
    dataset: SyntheticCXRDataset, path: str | Path, indices: Iterable[int] = range(8), tile: int = 192, columns: int = 4
) -> Path:
    """A PNG for humans: per phantom the film, the same with the lesion outlined in red, and its report."""
    font = ImageFont.load_default()
    cells = []
    for i in indices:
        prompt, ph = dataset.sample(i)
        grey = np.repeat(np.round(ph.image * 255).astype(np.uint8)[..., None], 3, -1)  # (H, W, 3)
        marked = grey.copy()
        marked[_outline(ph.mask)] = (255, 40, 40)
        pair = Image.fromarray(np.concatenate([grey, marked], 1)).resize((2 * tile, tile), Image.NEAREST)
        cell = Image.new("RGB", (2 * tile, tile + 44), "white")
        cell.paste(pair, (0, 0))
        caption = textwrap.wrap(f"{dataset.sample_id(i)}: {prompt}", width=2 * tile // 6)[:3]
        ImageDraw.Draw(cell).multiline_text((4, tile + 2), "\n".join(caption), fill="black", font=font)
        cells.append(cell)
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * (2 * tile + 8), rows * (tile + 52)), "white")
    for k, cell in enumerate(cells):
        sheet.paste(cell, ((k % columns) * (2 * tile + 8), (k // columns) * (tile + 52)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description="Write phantoms in the COVID-19 Radiography Database layout.")
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--limit", type=int, default=None, help="first N samples of the split (default: all)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num", type=int, default=4000, help="size of the split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="standard", help="phantom family: standard or heldout")
    parser.add_argument("--contact-sheet", default=None, help="also save a contact sheet PNG of the first 8 phantoms")
    args = parser.parse_args(argv)
    sizes = {f"num_{s}": args.num for s in SPLITS}
    dm = SyntheticCXRDataModule(image_size=args.image_size, seed=args.seed, family=args.family, **sizes)
    counts = dm.write_covid_layout(args.out, split=args.split, limit=args.limit)
    if args.contact_sheet:
        save_contact_sheet(dm.dataset(args.split), args.contact_sheet)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()

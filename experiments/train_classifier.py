"""The independent finding classifier that scores counterfactuals, trained on the same data as the generator.

python experiments/train_classifier.py [data=chexpert] [experiment=smoke] [trainer.max_steps=300] [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.classifier import FindingClassifier
from lightning_modules.runs.cli import load_config, log, run
from lightning_modules.runs.training import build_datamodule, build_trainer, fit, resume_path, seed_and_threads


def main(argv: list[str] | None = None) -> Path | None:
    cfg = load_config("train_classifier", argv)
    ckpt_path = resume_path(cfg, "finding classifier")  # first: an earlier run is never overwritten
    seed_and_threads(cfg)
    datamodule = build_datamodule(cfg)
    module = FindingClassifier(
        finding_names=list(datamodule.finding_names),
        total_steps=cfg.trainer.max_steps,
        **OmegaConf.to_container(cfg.model.classifier, resolve=True),
    )
    trainer = build_trainer(cfg, [])
    fit(cfg, trainer, module, datamodule, ckpt_path)
    if not trainer.is_global_zero:
        return None
    checkpoint = Path(trainer.checkpoint_callback.last_model_path)
    aurocs = {
        k.removeprefix("val/auroc/"): f"{v:.3f}"
        for k, v in trainer.callback_metrics.items()
        if k.startswith("val/auroc/")
    }
    log.warning("classifier checkpoint %s; val AUROC %s", checkpoint, aurocs)
    return checkpoint


if __name__ == "__main__":
    run(main)

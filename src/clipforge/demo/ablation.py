"""The demo's data ablation: CLIP with Iconify icons added to its pre-training (the "web"), at the same step
budget as the emoji-only CLIP, once with icons named like unseen concepts kept and once with them removed."""
from __future__ import annotations

from pathlib import Path

from clipforge.demo.config import DemoConfig
from clipforge.demo.data import icon_rows, training_captions
from clipforge.demo.evaluation import Evaluated, embed_all
from clipforge.demo.training import run_contrastive, train_config
from clipforge.evaluate.datasets import LabelledImages


def ablation_models(cfg: DemoConfig, emoji: Path, icons: Path, unseen_labels: list[str], id_test: set,
                    everything: LabelledImages, out: Path, steps: int) -> tuple[list[Evaluated], dict[str, float]]:
    """Two CLIPs on emoji + `cfg.ablation_icons` icons (kept / removed), embedded for every table; their seconds."""
    evaluated, seconds = [], {}
    for setting, excluded in (("kept", []), ("removed", unseen_labels)):
        name = f"CLIP + icons ({setting})"
        rows, dropped = icon_rows(icons, cfg.ablation_icons, cfg.seed, excluded)
        train_csv = out / f"train-icons-{setting}.csv"
        training_captions(emoji, cfg.styles("train"), "seen", train_csv, cfg.seed, exclude=id_test, extra_rows=rows)
        print(f"{name}: {len(rows)} icons ({dropped} named like unseen concepts removed)")
        model = run_contrastive(name, train_config(cfg, train_csv, out / f"clip-icons-{setting}", steps))
        seconds[name] = model.seconds
        evaluated.append(embed_all(name, model.model, model.tokenizer, model.preprocess, everything))
    return evaluated, seconds

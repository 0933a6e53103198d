"""The demo's data ablation: CLIP trained at the same step budget on the two data settings the main run does not
use, out of emoji only / emoji + icons with unseen-named icons kept / emoji + icons with them removed."""
from __future__ import annotations

from pathlib import Path

from clipforge.data.labelled import LabelledImages
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import clip_table
from clipforge.demo.evaluation import Evaluated, embed_all
from clipforge.demo.training import run_contrastive, train_config

SETTINGS = {"emoji only": (0, "keep"), "icons, unseen kept": (1, "keep"), "icons, unseen removed": (1, "remove")}


def main_setting(cfg: DemoConfig) -> str:
    """The data setting of the run's own CLIP."""
    return "emoji only" if cfg.icons == 0 else f"icons, unseen {'kept' if cfg.icons_unseen == 'keep' else 'removed'}"


def ablation_models(cfg: DemoConfig, emoji: Path, icons: Path, concepts: list[dict[str, str]], id_test: set,
                    everything: LabelledImages, out: Path, steps: int) -> tuple[list[Evaluated], dict[str, float]]:
    """CLIPs on the other two data settings, embedded for every table; their training seconds by name."""
    evaluated, seconds = [], {}
    for setting, (with_icons, unseen) in SETTINGS.items():
        if setting == main_setting(cfg):
            continue
        name = f"CLIP ({setting})"
        slug = setting.replace(",", "").replace(" ", "-")
        train_csv = out / f"train-{slug}.csv"
        _, icon_count, dropped = clip_table(cfg, emoji, icons, concepts, id_test, train_csv, cfg.icons * with_icons,
                                            unseen)
        print(f"{name}: {icon_count} icons ({dropped} named like unseen concepts removed)")
        model = run_contrastive(name, train_config(cfg, train_csv, out / f"clip-{slug}", steps))
        seconds[name] = model.seconds
        evaluated.append(embed_all(name, model.model, model.tokenizer, model.preprocess, everything))
    return evaluated, seconds

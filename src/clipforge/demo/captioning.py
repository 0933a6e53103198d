"""The demo's captioning section (--captioning 1): a CoCa (the demo's image tower, CoCa's split of its text tower,
a captioning decoder) trained on CLIP's table at CLIP's steps with both losses, then captions for held-out-style
images scored with BLEU-4 and CIDEr-D, next to a retrieval baseline: the training caption nearest to the image by the
demo CLIP's similarity. Outside the 10-minute budget (README: captioning)."""
from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from clipforge.data.labelled import decode_all
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import TRAIN_TEMPLATES, read_concepts
from clipforge.demo.objectives import caption_vocab, decoder_overrides
from clipforge.demo.training import TrainedModel, run_contrastive, train_config
from clipforge.evaluate.captioning import caption_scores
from clipforge.evaluate.report import Section
from clipforge.model.generation import caption_texts

IMAGES = 300  # held-out-style images captioned (seeded draw of the seen concepts)
BEAMS = 3
GRID = 12  # examples in the figure


def coca_model(cfg: DemoConfig, train_csv: Path, out: Path, steps: int) -> TrainedModel:
    """Train the demo's CoCa: CLIP's table, steps and seed; contrastive weight 1, caption weight 2 (open_clip's)."""
    config = dataclasses.replace(train_config(cfg, train_csv, out / "coca", steps),
                                 model_overrides=decoder_overrides(cfg.model),
                                 bpe_vocab=str(caption_vocab(train_csv, out / "caption-bpe.txt.gz")))
    return run_contrastive("CoCa", config)


def held_out_captions(emoji: Path, style: str, seed: int) -> tuple[list[Path], list[list[str]]]:
    """Up to IMAGES seen-concept images of `style` and each one's references: the caption candidates its concept is
    trained with (the dataset's captions and the label in every training sentence)."""
    labels = {c["hexcode"]: c["label"] for c in read_concepts(emoji)}
    with open(emoji / "captions.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["style"] == style and r["split"] == "seen"]
    rows = random.Random(seed).sample(rows, min(IMAGES, len(rows)))
    references = [r["caption"].split("|") + [t.format(labels[r["key"]]) for t in TRAIN_TEMPLATES] for r in rows]
    return [emoji / r["image"] for r in rows], references


@torch.no_grad()
def nearest_training_captions(clip: TrainedModel, pixels: torch.Tensor, train_csv: Path) -> list[str]:
    """The retrieval baseline: for each image, the distinct training caption CLIP finds most similar."""
    with open(train_csv, newline="", encoding="utf-8") as handle:
        captions = sorted({c for row in csv.DictReader(handle) for c in row["caption"].split("|") if c})
    model = clip.model.eval()
    texts = torch.cat([model.encode_text(clip.tokenizer(captions[i : i + 2048]), normalize=True).float()
                       for i in range(0, len(captions), 2048)])
    images = torch.cat([model.encode_image(pixels[i : i + 256], normalize=True).float()
                        for i in range(0, len(pixels), 256)])
    return [captions[i] for i in (images @ texts.t()).argmax(dim=1).tolist()]


def captioning_findings(cfg: DemoConfig, coca: TrainedModel, clip: TrainedModel, emoji: Path, train_csv: Path,
                        out: Path, sections: list[Section]) -> dict[str, Any]:
    """CoCa's captions of held-out-style images against the retrieval baseline: BLEU-1..4, CIDEr-D, a figure."""
    style = cfg.styles("held_out")[0]
    paths, references = held_out_captions(emoji, style, cfg.seed)
    pixels, keep = decode_all(paths, coca.preprocess)
    paths = [p for p, k in zip(paths, keep) if k]
    references = [r for r, k in zip(references, keep) if k]
    settings = {"strategy": "beam", "num_beams": BEAMS, "max_length": coca.model.context_length}
    written = [c for i in range(0, len(pixels), 32)
               for c in caption_texts(coca.model.eval(), pixels[i : i + 32], coca.tokenizer, **settings)]
    retrieved = nearest_training_captions(clip, decode_all(paths, clip.preprocess)[0], train_csv)
    scores = {"CoCa (generated)": caption_scores(written, references),
              "retrieval (nearest training caption by CLIP)": caption_scores(retrieved, references)}
    rows = [{"captions": name, **{k: round(v, 4) for k, v in s.items()}} for name, s in scores.items()]
    figure = _grid(paths[:GRID], written[:GRID], retrieved[:GRID], references[:GRID], out / "captions.png")
    sections.append(Section(
        "Captioning (CoCa)",
        f"CoCa trained {coca.steps} steps in {coca.seconds:.0f} s on CLIP's table (contrastive weight 1, caption "
        f"weight 2; its own BPE). {len(written)} {style} images of seen concepts (a style no model trained on), "
        f"{BEAMS}-beam search; references: the captions each concept is trained with "
        f"({sum(map(len, references)) / max(1, len(references)):.0f} per image). The baseline retrieves the nearest "
        "training caption (emoji and icon captions) by the demo CLIP's similarity.", rows, None, [figure]))
    examples = [{"image": str(p), "generated": w, "retrieved": r} for p, w, r in zip(paths[:GRID], written, retrieved)]
    return {"style": style, "images": len(written), "decoding": settings, "steps": coca.steps,
            "seconds": coca.seconds, "scores": scores, "examples": examples}


def _grid(paths: Sequence[Path], written: Sequence[str], retrieved: Sequence[str], references: Sequence[list[str]],
          path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = 4
    fig, axes = plt.subplots((len(paths) + columns - 1) // columns, columns, figsize=(13, 3.3 * len(paths) / columns))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, w, r, refs in zip(axes.flat, paths, written, retrieved, references):
        with Image.open(image) as picture:
            ax.imshow(picture.convert("RGBA"))
        ax.set_title(f"CoCa: {w}\nretrieved: {r}\nlabel: {refs[0]}", fontsize=7.5, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

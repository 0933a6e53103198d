"""int8 quality on real labelled data: clipforge.quantize(model, "int8") against the same model in fp32.

Run:  python benchmarks/int8_quality.py --model runs/demo/clip/step-XXXXXXXX [--data ~/.cache/clipforge/data/emoji]
          [--styles twitter,openmoji-black,noto-v1,emojione] [--split seen] [--templates emoji]
Prints, per emoji style: the smallest and mean cosine between int8 and fp32 image embeddings, the zero-shot
top-1 of each, and how often the two pick the same class (the issue's target: >= 98% agreement, cosine >= 0.99).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import clipforge
from clipforge.data.labelled import load_labelled_images
from clipforge.inference.features import labelled_image_features
from clipforge.inference.templates import get_templates
from clipforge.inference.zeroshot import build_classifier, zero_shot_predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint clipforge.load reads (e.g. the demo's CLIP)")
    parser.add_argument("--data", default=str(Path.home() / ".cache/clipforge/data/emoji"))
    parser.add_argument("--styles", default="twitter,openmoji-black,noto-v1,emojione")
    parser.add_argument("--split", default="seen")
    parser.add_argument("--templates", default="emoji")
    parser.add_argument("--towers", default="image,text", help="which towers run int8 (clipforge.quantize's towers)")
    args = parser.parse_args()
    model, preprocess = clipforge.load(args.model)
    models = {"fp32": model, "int8": clipforge.quantize(model, "int8", towers=tuple(args.towers.split(",")))}
    tokenizer = clipforge.get_tokenizer(args.model, context_length=model.context_length)
    print(f"{args.model}: {model.config.vision.layers if model.config.vision.is_resnet else 'ViT'} image tower, "
          f"{model.config.text_tower} text tower; templates {args.templates}; int8 towers: {args.towers}")
    print("\n| style | images | classes | image cosine min / mean | text cosine min | top-1 fp32 | top-1 int8 "
          "| same class |\n|---|---|---|---|---|---|---|---|")
    for style in args.styles.split(","):
        images = load_labelled_images(args.data, [style], args.split)
        features, logits, classifiers = {}, {}, {}
        for name, m in models.items():
            features[name], kept = labelled_image_features(m, images, preprocess, batch_size=256)
            classifiers[name] = build_classifier(m, tokenizer, kept.classnames, get_templates(args.templates),
                                                 cache=False)
            logits[name] = zero_shot_predict(m, features[name], classifiers[name])
        image_cos = (features["fp32"] * features["int8"]).sum(1)
        text_cos = (classifiers["fp32"] * classifiers["int8"]).sum(0)
        picks = {name: value.argmax(1) for name, value in logits.items()}
        top1 = {name: (pick == kept.labels).float().mean().item() for name, pick in picks.items()}
        same = (picks["fp32"] == picks["int8"]).float().mean().item()
        print(f"| {style} | {len(kept.labels)} | {len(kept.classnames)} "
              f"| {image_cos.min():.4f} / {image_cos.mean():.4f} | {text_cos.min():.4f} "
              f"| {top1['fp32']:.3f} | {top1['int8']:.3f} | {same:.3f} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

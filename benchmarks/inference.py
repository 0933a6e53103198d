"""Inference throughput: clipforge vs HF transformers (CLIPModel, or SiglipModel) on the same random weights.

Run:  python benchmarks/inference.py [--model ViT-B-32 | ViT-B-16-SigLIP] [--repeats 7] [--threads N]
Prints images/s and texts/s (median of repeats) for fp32, bf16 and int8 (clipforge.quantize), and ratios.
HF bf16 is measured both with weights cast to bf16 and with CPU autocast; the ratio uses the faster.
"% of matmul limit": clipforge's image-tower matmul time at the best rate this CPU reaches on each of
its shapes (benchmarks/matmul_limit.py, measured in the same run) over the measured time.
The compiled row (`compile_for_inference`: frozen weights, fused epilogues) compiles into a fresh cache
folder, then compiles again in-process from that cache, as a second run on the machine would.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from matmul_limit import matmul_limit

import clipforge
from clipforge.timing import median_seconds


def realistic_captions(n: int) -> list[str]:
    """Captions of typical alt-text length (roughly 8-20 BPE tokens)."""
    subjects = ["a dog", "two cats", "a red rocket", "an old man", "a bowl of soup", "the city skyline",
                "a child on a bicycle", "a wooden table", "three birds", "a snowy mountain road"]
    scenes = ["sitting on a sofa", "at sunset", "in the rain near a river", "on a white background",
              "photographed from above", "in a busy street market", "next to a blue car"]
    return [f"a photo of {subjects[i % 10]} {scenes[i % 7]}, high quality picture number {i}" for i in range(n)]


def reference_model(model: clipforge.CLIP, texts: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """transformers' model with the same weights (written by save_pretrained format="hf"), and caption ids."""
    from transformers import CLIPModel, SiglipModel

    siglip = model.config.vision.pool == "map"
    with tempfile.TemporaryDirectory() as tmp:
        clipforge.save_pretrained(model, tmp, format="hf", tokenizer=clipforge.get_tokenizer())
        hf = (SiglipModel if siglip else CLIPModel).from_pretrained(tmp, attn_implementation="sdpa").eval()
    if not siglip:
        return hf, clipforge.tokenize(realistic_captions(texts))
    # SigLIP rows are padded to the full context (64) and pooled at the last position: random ids are as fast.
    generator = torch.Generator().manual_seed(0)
    return hf, torch.randint(2, model.config.text.vocab_size, (texts, model.context_length), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="a registry ViT (a SigLIP one runs against SiglipModel)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--text-batch", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = clipforge.create_model(args.model).eval()
    hf, tokens = reference_model(model, args.text_batch)
    size = model.image_size
    pixels = torch.randn(args.image_batch, 3, size, size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} random weights "
          f"({type(hf).__name__} as the reference); images b{args.image_batch}@{size}, texts "
          f"b{args.text_batch}x{tokens.shape[1]}; median of {args.repeats}")

    def hf_image(m, x):
        return lambda: m.get_image_features(pixel_values=x)

    def hf_text(m):
        return lambda: m.get_text_features(input_ids=tokens)

    rows = []
    for precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        ours = model.to(dtype)
        x = pixels.to(dtype)
        ours_img = median_seconds(lambda ours=ours, x=x: ours.encode_image(x), args.repeats)
        ours_txt = median_seconds(lambda ours=ours: ours.encode_text(tokens), args.repeats)
        hf_variants = {}
        if precision == "fp32":
            hf_variants["HF fp32"] = (median_seconds(hf_image(hf, pixels), args.repeats),
                                      median_seconds(hf_text(hf), args.repeats))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hf_variants["HF autocast"] = (median_seconds(hf_image(hf, pixels), args.repeats),
                                              median_seconds(hf_text(hf), args.repeats))
            hf_cast = hf.to(torch.bfloat16)
            hf_variants["HF cast"] = (median_seconds(hf_image(hf_cast, x), args.repeats),
                                      median_seconds(hf_text(hf_cast), args.repeats))
            hf.float()
        model.float()
        best_img = min(v[0] for v in hf_variants.values())
        best_txt = min(v[1] for v in hf_variants.values())
        for label, (img_s, txt_s) in hf_variants.items():
            rows.append((precision, label, img_s, txt_s, "", ""))
        rows.append((precision, "clipforge", ours_img, ours_txt,
                     f"{best_img / ours_img:.2f}x", f"{best_txt / ours_txt:.2f}x"))

    # int8 (clipforge.quantize): dynamic int8 linear layers on the fp32 model.
    quantized = clipforge.quantize(model, "int8")
    q_img = median_seconds(lambda: quantized.encode_image(pixels), args.repeats)
    q_txt = median_seconds(lambda: quantized.encode_text(tokens), args.repeats)
    rows.append(("int8", "clipforge.quantize", q_img, q_txt, f"{best_img / q_img:.2f}x", f"{best_txt / q_txt:.2f}x"))
    bf16_img, bf16_txt = next((r[2], r[3]) for r in rows if r[:2] == ("bf16", "clipforge"))
    int8_note = f"int8 vs clipforge bf16: {bf16_img / q_img:.2f}x images/s, {bf16_txt / q_txt:.2f}x texts/s"

    # torch.compile'd towers (inductor, frozen weights), bf16: cold compile into a fresh cache, then warm.
    compiled = clipforge.create_model(args.model).eval()
    compiled.load_state_dict(model.state_dict())
    compiled = compiled.to(torch.bfloat16)
    x = pixels.bfloat16()
    compile_s = []
    with tempfile.TemporaryDirectory() as cache, torch.inference_mode():
        for _ in ("cold", "warm"):
            torch._dynamo.reset()
            compiled.compile_for_inference(cache)
            start = time.perf_counter()
            compiled.encode_image(x), compiled.encode_text(tokens)
            compile_s.append(time.perf_counter() - start)
        c_img = median_seconds(lambda: compiled.encode_image(x), args.repeats)
        c_txt = median_seconds(lambda: compiled.encode_text(tokens), args.repeats)
    rows.append(("bf16", f"clipforge compiled (compile {compile_s[0]:.0f} s cold, {compile_s[1]:.0f} s cached)",
                 c_img, c_txt, f"{best_img / c_img:.2f}x", f"{best_txt / c_txt:.2f}x"))
    limits = {p: matmul_limit(args.model, args.image_batch, d, args.repeats)[0]
              for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    print(f"\n| precision | impl | ms / {args.image_batch} images | images/s | % of matmul limit "
          f"| ms / {args.text_batch} texts | texts/s | image ratio vs best HF | text ratio vs best HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision, label, img_s, txt_s, r_img, r_txt in rows:
        limit = f"{limits[precision] / img_s:.0%}" if precision in limits and label.startswith("clipforge") else ""
        print(f"| {precision} | {label} | {img_s * 1e3:.0f} | {args.image_batch / img_s:.1f} | {limit} | "
              f"{txt_s * 1e3:.0f} | {args.text_batch / txt_s:.0f} | {r_img} | {r_txt} |")
    print(f"\nmatmul limit of the image tower: fp32 {limits['fp32'] * 1e3:.0f} ms, bf16 {limits['bf16'] * 1e3:.0f} ms "
          "(benchmarks/matmul_limit.py prints it by shape)")
    print(f"\n{int8_note} (ratio columns: against the best HF bf16 row)")


if __name__ == "__main__":
    main()

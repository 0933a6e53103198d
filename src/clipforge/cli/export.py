"""`clipforge export onnx`: image and text towers as ONNX graphs, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.cli.model_args import add_model_arguments, load_model, load_tokenizer
from clipforge.config_flags import default_of
from clipforge.export.onnx import DEFAULT_OPSET, PARITY_ATOL
from clipforge.search.export import export_embeddings


def run_onnx(args: argparse.Namespace) -> None:
    """Export, verify and print where the graphs went and how close they are to PyTorch."""
    from clipforge.export.onnx import export_onnx, require_onnx

    require_onnx(verify=not args.no_verify)  # onnx, onnxscript and onnxruntime are an extra
    model, _ = load_model(args, args.checkpoint)
    tokenizer = load_tokenizer(args, model, args.checkpoint)  # found as the model was (--model-config, ...)
    config = export_onnx(model, args.out_dir, source=args.checkpoint, opset=args.opset, verify=not args.no_verify,
                         atol=args.atol, int8=args.int8, tokenizer=tokenizer)
    print(f"wrote {args.out_dir / config['image_encoder']} and {args.out_dir / config['text_encoder']} "
          f"(opset {config['opset']}, embed dim {config['embed_dim']}) with tokenizer and onnx_config.json")
    if "parity" in config:
        parity = config["parity"]
        print(f"onnxruntime vs PyTorch: max abs diff {parity['max_abs_diff']:.3g} (limit {parity['atol']:g}) "
              f"over batch 1 and 3, int32 and int64 tokens")
    if "int8" in config:
        print(f"int8 graphs {config['image_encoder']}, {config['text_encoder']}: embedding cosine to fp32 "
              f">= {config['int8']['min_cosine']:.4f} (limit {config['int8']['limit']})")


def run_npy(args: argparse.Namespace) -> None:
    """Write an index's embeddings + metadata in clip-retrieval's layout."""
    from clipforge.search.export import export_embeddings

    done = export_embeddings(args.index_dir, args.out_dir, part_size=args.part_size, dtype=args.dtype)
    print(f"wrote {done['rows']} embeddings ({done['dim']}-d {done['dtype']}) in {done['parts']} part(s) to "
          f"{args.out_dir}/img_emb and their metadata to {args.out_dir}/metadata")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge export onnx`."""
    p = sub.add_parser("export", help="export a model to another runtime (onnx) or an index to other engines (npy)")
    formats = p.add_subparsers(dest="format", required=True)
    o = formats.add_parser("onnx", help="image and text encoders as two ONNX graphs with a dynamic batch")
    o.add_argument("checkpoint", help="checkpoint (any format clipforge.load reads) or registry name")
    o.add_argument("out_dir", type=Path, help="output folder (graphs, tokenizer, onnx_config.json)")
    add_model_arguments(o, flag=None, device=True)
    # Not `auto`: the check runs on the CPU (onnxruntime's CPU provider), so a GPU found by default would only
    # move the model there and back; export traced on the CPU before the flag existed, and still does unless asked.
    o.set_defaults(device="cpu")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the graphs")
    o.add_argument("--atol", type=float, default=PARITY_ATOL, help="largest allowed |ONNX - PyTorch| (fp32)")
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime parity check")
    o.add_argument("--int8", action="store_true",
                   help="also write int8 graphs (onnxruntime dynamic quantisation) and name them in the config")
    o.set_defaults(func=run_onnx)
    n = formats.add_parser("npy", help="an index's embeddings (.npy) + metadata (.parquet), clip-retrieval's layout")
    n.add_argument("index_dir", type=Path, help="folder written by `clipforge index`")
    n.add_argument("out_dir", type=Path, help="output folder (img_emb/, metadata/)")
    n.add_argument("--part-size", type=int, default=default_of(export_embeddings, "part_size"),
                   help="rows per .npy / .parquet pair")
    n.add_argument("--dtype", choices=("float16", "float32"), default=default_of(export_embeddings, "dtype"),
                   help="float16: half the size, as clip-retrieval writes (cosine changes < 1e-3)")
    n.set_defaults(func=run_npy)

"""`clipforge index` (embed a collection, incrementally) and `clipforge search` (query it by text or image)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clipforge.cli.model_args import add_precision_argument, command_precision
from clipforge.config_flags import default_of
from clipforge.device import DEVICE_HELP, resolve_device
from clipforge.errors import ConfigError


def run_index(args: argparse.Namespace) -> None:
    """Build or update an index and print what changed."""
    from dataclasses import asdict

    from clipforge.checkpoint.io import refuse_random_weights
    from clipforge.data.images import SKIP_LOG
    from clipforge.search import build_index

    refuse_random_weights(args.model, args.random_weights, args.pretrained)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 reports for all, and captions
    captioner = _captioner(args) if args.captions and rank0 else None
    precision = command_precision(args.precision, resolve_device(args.device))
    stats = build_index(args.source, args.out, model=args.model, batch_size=args.batch_size,
                        progress=not args.quiet and sys.stderr.isatty(), backend=args.backend,
                        shard_size=args.shard_size, precision=precision, target_recall=args.target_recall,
                        device=args.device, pretrained=args.pretrained, workers=args.workers)
    if not rank0:
        return
    captions = None
    if captioner is not None:
        from clipforge.search.captions import caption_index

        model, tokenizer, preprocess = captioner
        model.to(resolve_device(args.device))  # after the build: under torchrun it has picked this rank's GPU
        captions = caption_index(args.out, model, tokenizer, preprocess, num_beams=args.caption_beams,
                                 progress=not args.quiet and sys.stderr.isatty())
    if args.json:
        print(json.dumps({**asdict(stats), **({"captions": asdict(captions)} if captions else {})}, indent=1))
        return
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.skipped.items())) or "none"
    if stats.skipped:
        skipped += f" (listed in {args.out / SKIP_LOG})"
    resumed = f" ({stats.resumed} from an interrupted run)" if stats.resumed else ""
    print(f"{args.out}: {stats.total} images; added {stats.added}, updated {stats.updated}{resumed}, "
          f"removed {stats.removed}, unchanged {stats.unchanged}; skipped: {skipped}")
    backend = stats.backend
    detail = ", ".join(f"{k}={v}" for k, v in backend.items() if k != "kind")
    print(f"search backend: {backend['kind']}" + (f" ({detail})" if detail else "") + f"; {stats.seconds:.1f} s")
    if captions is not None:
        unread = ", ".join(f"{reason} {count}" for reason, count in sorted(captions.skipped.items())) or "none"
        print(f"captions written: {captions.written}; images not read for captioning: {unread}")


def _captioner(args: argparse.Namespace) -> tuple:
    """--captions: (model, tokenizer, preprocess) of --model, loaded on the CPU before anything is embedded so a model
    without a captioning decoder, or a bad beam width, is refused first."""
    from clipforge.checkpoint.io import get_tokenizer, load
    from clipforge.checkpoint.options import LoadOptions

    if args.caption_beams < 1:
        raise ConfigError(f"--caption-beams must be >= 1, got {args.caption_beams}")
    model, preprocess = load(args.model, pretrained=args.pretrained)
    if model.text_decoder is None:
        raise ConfigError(f"--captions needs a model with a captioning decoder (CoCa); {args.model} has none")
    tokenizer = get_tokenizer(args.model, context_length=model.context_length,
                              options=LoadOptions(pretrained=args.pretrained) if args.pretrained else None)
    return model, tokenizer, preprocess


def run_search(args: argparse.Namespace) -> None:
    """Print the k best matches of a text or image query."""
    from clipforge.data.images import load_image
    from clipforge.search import ImageIndex, QueryEncoder

    given = [name for name in ("text", "image", "audio") if getattr(args, name) is not None]
    if not given:
        raise ConfigError('no query: give a text (clipforge search INDEX "a red bicycle"), --image PATH or '
                          "--audio PATH")
    if len(given) > 1:
        raise ConfigError(f"give one query: a text, --image or --audio, not {' and '.join(given)}")
    index = ImageIndex.open(args.index)
    # another model than the index's is refused, unless it has the index model's image tower (a bound model)
    model = index.query_model(args.model, args.pretrained)
    device = resolve_device(args.device)
    encoder = QueryEncoder(model.name, precision=command_precision(args.precision, device), device=device,
                           pretrained=model.pretrained)
    if args.image is not None:
        query = encoder.embed_images([load_image(args.image)])
    elif args.audio is not None:
        query = encoder.embed_audio([args.audio])
    else:
        query = encoder.embed_texts([args.text], truncate=args.truncate, modality=args.label_modality)
    if query.shape[1] != index.dim:
        raise ConfigError(f"the model embeds into {query.shape[1]} dimensions, the index holds {index.dim}")
    scores, ids = index.search(query, args.k)
    results = []
    for rank, (score, id_) in enumerate(zip(scores[0].tolist(), ids[0].tolist()), start=1):
        if id_ < 0:
            continue
        record = index.record(id_)
        results.append({"rank": rank, "score": round(score, 6), **record})
    if args.json:
        query_desc = {given[0]: args.text if args.text is not None else str(getattr(args, given[0]))}
        if args.text is not None and args.label_modality != "text":
            query_desc["modality"] = args.label_modality
        print(json.dumps({"query": query_desc, "backend": index.backend["kind"], "results": results}, indent=1))
        return
    for r in results:
        print(f"{r['rank']:>3}  {r['score']:.4f}  {r['path']}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge index` and `clipforge search`."""
    from clipforge.search.backend import KINDS
    from clipforge.search.build import build_index

    p = sub.add_parser("index", help="embed an image folder / caption CSV / webdataset into a search index",
                       description="Re-running updates the index: only new or changed images are embedded, deleted "
                                   "ones are dropped, and a killed run resumes. Runs under torchrun too.")
    p.add_argument("source", help="image folder, caption CSV (image[,caption]) or webdataset shard(s) (.tar, {a..b})")
    p.add_argument("--model", required=True, help="checkpoint (any format clipforge.load reads), hf-hub:ORG/NAME, "
                                                  "or an architecture with --pretrained")
    p.add_argument("--pretrained", default=None, help="weights tag of --model (`clipforge models --pretrained`)")
    p.add_argument("--random-weights", action="store_true",
                   help="allow a registry name without weights: randomly initialised, for smoke tests only")
    p.add_argument("--out", required=True, type=Path, help="index folder (created or updated)")
    p.add_argument("--batch-size", type=int, default=default_of(build_index, "batch_size"),
                   help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=default_of(build_index, "shard_size"),
                   help="embeddings per shard file (the unit of resuming)")
    p.add_argument("--backend", choices=KINDS, default=default_of(build_index, "backend"),
                   help="auto: exact up to 50k images, else faiss-ivf")
    p.add_argument("--target-recall", type=float, default=default_of(build_index, "target_recall"),
                   help="FAISS: tune to this recall@10 against exact")
    add_precision_argument(p)  # the index's manifest records the resolved value
    p.add_argument("--device", default="auto", help=DEVICE_HELP + "; under torchrun each rank takes its local GPU")
    p.add_argument("--workers", type=int, default=default_of(build_index, "workers"),
                   help="processes decoding images while the model embeds (0: in the main process)")
    p.add_argument("--captions", action="store_true",
                   help="a CoCa --model writes captions for images the source gives none (shown in results, marked "
                        "generated; kept across updates until the file changes)")
    p.add_argument("--caption-beams", type=int, default=3, help="--captions: beam width (1: greedy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the build statistics as JSON (skipped files by reason "
                                                      "under skipped_files; OUT/skipped.jsonl lists them too)")
    p.set_defaults(func=run_index)

    p = sub.add_parser("search", help="search an index by text or by image")
    p.add_argument("index", type=Path, help="index folder written by `clipforge index`")
    p.add_argument("text", nargs="?", help="text query")
    p.add_argument("--image", type=Path, help="image query instead of a text")
    p.add_argument("--audio", type=Path, help="audio query (a recording) through the model's bound audio tower: "
                   "--model names the bound model (`clipforge bind`); the index may predate the binding")
    p.add_argument("--label-modality", default="text",
                   help="the text tower that reads a text query: 'text' or a bound one, e.g. text-ko")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results")
    p.add_argument("--model", default=None, help="query model (default: the one the index was built with); another "
                                                 "model is refused, a new location of a moved checkpoint is taken")
    p.add_argument("--pretrained", default=None,
                   help="weights tag of --model (without --model: the index's own model and tag)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_precision_argument(p)
    p.add_argument("--truncate", action="store_true",
                   help="cut a text longer than the model's context (default: refuse)")
    p.add_argument("--json", action="store_true", help="print the query and results as JSON")
    p.set_defaults(func=run_search)

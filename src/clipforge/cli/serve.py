"""`clipforge serve INDEX_DIR`: the search API and web page over one image index (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.cli.model_args import add_precision_argument, command_precision
from clipforge.device import DEVICE_HELP, resolve_device
from clipforge.serve.state import ServeConfig


def run(args: argparse.Namespace) -> None:
    """Bind the port, load the index and model once, then serve until interrupted."""
    import uvicorn

    from clipforge.serve import ServeConfig, create_app
    from clipforge.serve.runner import bind_socket

    config = ServeConfig(max_k=args.max_k, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         allow_random_weights=args.random_weights, device=args.device, model=args.model,
                         max_audio_seconds=args.max_audio_seconds,
                         precision=command_precision(args.precision, resolve_device(args.device)))
    # Bound first: a taken port fails in a second, with one error line (exit 2), before the model loads.
    with bind_socket(args.host, args.port) as sock:
        app = create_app(args.index_dir, config)  # a missing or broken index fails here: exit 2 with a message
        port = sock.getsockname()[1]  # the one the OS picked for --port 0
        print(f"serving {len(app.state.index)} images from {args.index_dir} at http://{args.host}:{port}/ "
              f"(API docs: /docs, spec: /openapi.json)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown (uvicorn.run swallows it)
            pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge serve`."""
    p = sub.add_parser("serve", help="serve an image index: search API + web page")
    p.add_argument("index_dir", type=Path, help="folder written by `clipforge index`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default: no auth is built in)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: a free one, printed)")
    p.add_argument("--max-k", type=int, default=ServeConfig.max_k, help="largest k a request may ask for")
    p.add_argument("--max-upload-mb", type=float, default=ServeConfig.max_upload_bytes / 2**20,
                   help="largest upload (an image or a recording)")
    p.add_argument("--max-audio-seconds", type=float, default=ServeConfig.max_audio_seconds,
                   help="longest recording POST /search/audio takes")
    p.add_argument("--model", default="", help="query model: the index's own by default; a model with towers bound "
                   "to it (`clipforge bind`) adds search by recording (POST /search/audio) and its text towers "
                   "(/search?modality=text-ko); the index need not be rebuilt")
    p.add_argument("--max-batch", type=int, default=ServeConfig.max_batch, help="micro-batch size for query embedding")
    p.add_argument("--batch-wait-ms", type=float, default=ServeConfig.batch_wait_ms,
                   help="how long a batch waits to fill")
    p.add_argument("--random-weights", action="store_true",
                   help="serve an index built with a registry name (random weights): for smoke tests only")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_precision_argument(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run)

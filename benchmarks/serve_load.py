"""Load test of `clipforge serve`: 1,000 concurrent text searches against a server on loopback.

Run:  python benchmarks/serve_load.py [--index DIR] [--requests 1000] [--connections 100]
Without --index it builds a small index (tiny random model, generated images) in a temporary folder.
The server runs in its own process (`clipforge serve`, so client and server do not share a GIL); all
requests are started at once and share `--connections` keep-alive connections (a small stdlib
client: see `Connection`). Latency counts from the request's start, queueing for a connection
included. Prints errors, p50/p99 latency, requests/s and the server's micro-batching counts as a
table; exits 1 on any error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlencode
from urllib.request import urlopen

import numpy as np
from PIL import Image

import clipforge

WORDS = ["red", "green", "blue", "striped", "round", "square", "small", "large", "bright", "dark", "cat", "dog"]


def build_demo_index(root: Path, images: int) -> Path:
    """A tiny random model and an index of `images` generated pictures, for a self-contained run."""
    from clipforge.search import build_index

    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(images):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        picture = Image.new("RGB", (64, 48), colour)
        picture.paste(tuple(255 - c for c in colour), (8, 8, 8 + i % 40, 40))
        picture.save(folder / f"img{i:04d}.png")
    model_dir = clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32").eval(), root / "model")
    build_index(folder, root / "index", model=str(model_dir), batch_size=64, progress=False)
    return root / "index"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    """`clipforge serve` in a child process; returns once /healthz answers."""
    command = [sys.executable, "-m", "clipforge.cli.main", "serve", str(index), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return server
        except (URLError, OSError):
            pass
        time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not answer /healthz within 120 s")


class Connection:
    """One keep-alive HTTP/1.1 connection; a minimal client on asyncio streams.

    Measured here: httpx's AsyncClient topped out near 65 requests/s with 100 pooled connections
    even on /healthz, while the server answers thousands; this client measures the server, not itself.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of one GET; the server always sends Content-Length for these JSON answers."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


async def load(port: int, requests: int, connections: int, timeout: float) -> tuple[list[float], list[str], float]:
    """Fire all requests at once over a pool of connections; (latencies of successes in s, errors, wall s)."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))

    async def one(i: int) -> tuple[float | None, str | None]:
        query = urlencode({"q": f"a {WORDS[i % 12]} {WORDS[(i * 7) % 12]} thing number {i}", "k": 1 + i % 20})
        start = time.perf_counter()  # includes the wait for a free connection: what a client sees
        connection = await pool.get()
        try:
            status, body = await asyncio.wait_for(connection.get(f"/search?{query}"), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
            connection = Connection(*await asyncio.open_connection("127.0.0.1", port))  # the old one is unusable
            return None, f"{type(error).__name__}: {error}"
        finally:
            pool.put_nowait(connection)
        took = time.perf_counter() - start
        if status != 200 or not json.loads(body)["results"]:
            return None, f"HTTP {status}: {body[:200]!r}"
        return took, None

    for i in range(20):  # warm-up: first-call allocations and lazy imports are not the steady state
        await one(i)
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait().writer.close()
    return [t for t, _ in outcomes if t is not None], [e for _, e in outcomes if e is not None], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="an existing index (default: build a small one)")
    parser.add_argument("--images", type=int, default=500, help="images in the generated index")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=100, help="client connection pool size")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or build_demo_index(Path(tmp), args.images)
        port = free_port()
        server = start_server(index, port)
        try:
            base = f"http://127.0.0.1:{port}"
            latencies, errors, wall = asyncio.run(load(port, args.requests, args.connections, args.timeout))
            with urlopen(f"{base}/healthz", timeout=10) as response:
                health = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(10)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    text = health["batches"]["text"]
    rows = [("requests", f"{args.requests} (all in flight at once, {args.connections} connections)"),
            ("index", f"{health['images']} images, dim {health['dim']}"),
            ("errors", str(len(errors))),
            ("p50 latency", f"{np.percentile(ms, 50):.1f} ms"),
            ("p99 latency", f"{np.percentile(ms, 99):.1f} ms"),
            ("max latency", f"{ms.max():.1f} ms"),
            ("throughput", f"{len(latencies) / wall:.1f} requests/s ({wall:.2f} s wall)"),
            ("text forward passes", f"{text['batches']} for {text['items']} queries "
                                    f"(mean batch {text['items'] / max(text['batches'], 1):.1f})"),
            ("machine", f"{os.cpu_count()} CPUs")]
    width = max(len(name) for name, _ in rows)
    print(f"| {'metric'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    for error in errors[:5]:
        print("error:", error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bind the server's socket before serving (`clipforge serve`), and run an app on loopback in a background thread
(browser tests, benchmarks, notebooks)."""
from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from typing import Any, Iterator

from clipforge.errors import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), as uvicorn binds; ConfigError if it cannot be.

    Bound by the caller, so a taken port is refused before the model loads and before anything claims to
    serve (uvicorn binds only after the app's startup, and exits 3 with a log line when it cannot).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # uvicorn's rule: a colon means IPv6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        fix = ("another process listens there: pass another --port, or stop that process"
               if error.errno == errno.EADDRINUSE else "--host must be an address of this machine")
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error}): {fix}") from None
    return sock


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Start uvicorn for `app` (port 0: a free one), yield its base URL, stop it on exit."""
    import uvicorn

    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]  # the port the OS picked for port 0
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=bound, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {host}:{bound}")
            time.sleep(0.02)
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()

"""Small file helpers shared by every package: the one way clipforge replaces a file atomically, and JSON
that is valid JSON."""
from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

# Mode asked of the kernel for a new file; it applies the process umask (022: rw-r--r--), as open() does.
# tempfile.mkstemp asks 0600 instead, which left every checkpoint, report and index readable by its owner only.
NEW_FILE_MODE = 0o666


def _new_temp_file(path: Path) -> Path:
    """Create an empty `.NAME.XXXXXXXX.tmp` beside `path` with the umask's mode (O_EXCL: never someone else's)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it is synced and renamed over `path`, on error removed.

    The file gets the mode a plain `open(path, "w")` would (0666 less the umask), not mkstemp's 0600, even when
    the writer replaces the temp file with its own (safetensors' save_file writes a 0600 file and renames it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        umask_mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the kernel gave a new file: no umask read or race
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != umask_mode:
            os.chmod(tmp, umask_mode)
        with open(tmp, "rb") as handle:  # the data reaches the disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a synced temp file in the same folder and a rename: never a torn file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def cache_root() -> Path:
    """Where clipforge keeps what it can rebuild (compiled graphs, decoded images, weights, probes):
    $CLIPFORGE_CACHE, default ~/.cache/clipforge."""
    return Path(os.environ.get("CLIPFORGE_CACHE") or Path.home() / ".cache" / "clipforge").expanduser()


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf floats as None, in nested dicts, lists and tuples: json.dumps writes NaN, not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

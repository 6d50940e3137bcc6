"""The data registry: every file effir knows, by URL and sha256, and `fetch` to get a verified local copy.

`manifest.tsv` (next to this file) holds metadata only: the files themselves are never part of the package.
`fetch` looks, in order, in

1. the mirror `effir._paths.data_mirror()` ($EFFIR_DATA_DIR, else `../shared/data`), laid out as
   `<owner>/<repo>/<commit>/<path>` (the path of the public raw URL);
2. the download cache `effir._paths.cache_dir() / "data"`, same layout;
3. the network: the file's URL (or `$EFFIR_DATA_URL_BASE` / `url_base` + "/" + path, for mirrors and tests),
   downloaded into the cache through a temporary file and an atomic rename.
   `EFFIR_OFFLINE=1` forbids this step.

Every file is checked against its sha256 before it is returned. Verified files are remembered by
(absolute path, size, mtime_ns) in `cache_dir()/data/verified.json`, so re-verification is a `stat`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from effir._paths import cache_dir, data_mirror

MANIFEST = Path(__file__).with_name("manifest.tsv")
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A data file could not be provided (missing offline, download failed, checksum mismatch)."""


class DataFileMissing(DataError, FileNotFoundError):
    """The file is in no mirror or cache, and downloading is forbidden or failed."""


class ChecksumMismatch(DataError, ValueError):
    """The file's size or sha256 differs from the registry."""


@dataclass(frozen=True)
class DataFile:
    """One registered file.

    path: `<owner>/<repo>/<commit>/<path>` (also its place in a mirror and in the cache);
    url: where it is downloaded from; sha256: hex digest; size: bytes;
    dataset: e.g. "xquad-r", "tquad" (None for licence/readme files); role: "eval", "train-mono",
    "train-parallel", "train-sentence-pairs" or "licence/readme"; langs: ISO 639-1 codes; licence: free text.
    """

    path: str
    url: str
    sha256: str
    size: int
    dataset: str | None
    role: str
    langs: tuple[str, ...]
    licence: str

    @property
    def name(self) -> str:
        """The file name (last path component)."""
        return self.path.rsplit("/", 1)[-1]


@lru_cache(maxsize=1)
def _manifest() -> tuple[DataFile, ...]:
    lines = [ln for ln in MANIFEST.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    out = []
    for row in csv.DictReader(lines, delimiter="\t"):
        out.append(
            DataFile(
                path=row["path"],
                url=row["url"],
                sha256=row["sha256"].lower(),
                size=int(row["size"]),
                dataset=None if row["dataset"] == "-" else row["dataset"],
                role=row["role"],
                langs=() if row["langs"] == "-" else tuple(row["langs"].split(",")),
                licence=row["licence"],
            )
        )
    return tuple(out)


def datasets() -> list[str]:
    """Names of the registered data sets, sorted."""
    return sorted({f.dataset for f in _manifest() if f.dataset})


def files(dataset: str | None = None, role: str | None = None) -> list[DataFile]:
    """Registered files, filtered by data set name and/or role (exact match), in manifest order.

    Raises ValueError for an unknown data set or role (naming the known ones), so a typo is not an
    empty list.
    """
    allf = _manifest()
    if dataset is not None and dataset not in {f.dataset for f in allf}:
        raise ValueError(f"dataset must be one of {datasets()}, got {dataset!r}")
    roles = sorted({f.role for f in allf})
    if role is not None and role not in roles:
        raise ValueError(f"role must be one of {roles}, got {role!r}")
    return [f for f in allf if (dataset is None or f.dataset == dataset) and (role is None or f.role == role)]


def get(path: str) -> DataFile:
    """The registered file whose path (`owner/repo/commit/path`, optionally `github/`-prefixed) or URL is `path`."""
    key = path[len("github/"):] if path.startswith("github/") else path
    for f in _manifest():
        if key in (f.path, f.url):
            return f
    raise ValueError(f"file must be a registered path or URL (see effir/data/manifest.tsv), got {path!r}")


# --------------------------------------------------------------------------------------------- verify


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verified_db() -> Path:
    return cache_dir() / "data" / "verified.json"


def _load_verified() -> dict:
    try:
        return json.loads(_verified_db().read_text())
    except (OSError, ValueError):
        return {}


def _remember_verified(path: Path, sha256: str) -> None:
    st = path.stat()
    db = _load_verified()
    db[str(path.resolve())] = [st.st_size, st.st_mtime_ns, sha256]
    target = _verified_db()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Atomic write: several processes (DDP ranks, pytest workers) may verify at once.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".verified-", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(db, fh)
    os.replace(tmp, target)


def verify(file: DataFile, path: Path) -> Path:
    """Check `path` against `file`'s size and sha256; return `path` or raise ChecksumMismatch.

    A file already verified with the same (path, size, mtime) is not hashed again.
    """
    st = path.stat()
    entry = _load_verified().get(str(path.resolve()))
    if entry == [st.st_size, st.st_mtime_ns, file.sha256]:
        return path
    if st.st_size != file.size:
        raise ChecksumMismatch(
            f"{path}: size {st.st_size} bytes, expected {file.size} for {file.path} (from {file.url}); "
            "the file is truncated or a different version: replace it (a cached copy may be deleted) and fetch again"
        )
    digest = _sha256_file(path)
    if digest != file.sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest}, expected {file.sha256} for {file.path} (from {file.url}); "
            "the file is corrupt or a different version: replace it (a cached copy may be deleted) and fetch again"
        )
    _remember_verified(path, digest)
    return path


# ---------------------------------------------------------------------------------------------- fetch


def _offline() -> bool:
    return os.environ.get("EFFIR_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _download_url(file: DataFile, url_base: str | None) -> str:
    base = url_base if url_base is not None else os.environ.get("EFFIR_DATA_URL_BASE")
    return f"{base.rstrip('/')}/{file.path}" if base else file.url


def _download(file: DataFile, url: str, dest: Path, timeout: float) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the destination folder so the final rename is atomic (same filesystem): a reader
    # never sees a half-written file, and concurrent downloads of the same file are harmless.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{file.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        if n != file.size or h.hexdigest() != file.sha256:
            raise ChecksumMismatch(
                f"downloaded {file.path} from {url}: {n} bytes, sha256 {h.hexdigest()}; expected "
                f"{file.size} bytes, sha256 {file.sha256} (registry URL {file.url})"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:  # HTTPError is a URLError; timeouts are OSError
        raise DataFileMissing(
            f"could not download {file.path} from {url}: {exc}. Put the file in a mirror "
            f"(EFFIR_DATA_DIR=<dir holding github/{file.path}>) or fetch it by hand into {dest}"
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    _remember_verified(dest, file.sha256)
    return dest


def fetch(file: DataFile | str, *, url_base: str | None = None, timeout: float = 60.0) -> Path:
    """A verified local path for `file` (a DataFile, or a registered path / URL).

    Order: mirror, cache, download (see the module docstring). `url_base` (or $EFFIR_DATA_URL_BASE)
    replaces "https://raw.githubusercontent.com" in front of the file's path. `timeout` is the socket
    timeout in seconds. Raises DataFileMissing (missing offline or download failed) or ChecksumMismatch,
    both naming the file and its URL.
    """
    if isinstance(file, str):
        file = get(file)
    elif not isinstance(file, DataFile):
        raise ValueError(f"file must be a DataFile or a registered path/URL string, got {type(file).__name__}")
    mirror = data_mirror()
    looked = []
    if mirror is not None:
        cand = mirror / file.path
        looked.append(str(cand))
        if cand.is_file():
            return verify(file, cand)
    cached = cache_dir() / "data" / file.path
    looked.append(str(cached))
    if cached.is_file():
        return verify(file, cached)
    if _offline():
        raise DataFileMissing(
            f"{file.path} is not available offline (EFFIR_OFFLINE is set); looked in: {', '.join(looked)}. "
            f"Download it from {file.url} or set EFFIR_DATA_DIR to a mirror holding github/{file.path}"
        )
    return _download(file, _download_url(file, url_base), cached, timeout)

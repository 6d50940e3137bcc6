"""The data registry: manifest, mirror look-up, verified cache, and real downloads from a local HTTP server."""
import csv
import functools
import hashlib
import http.server
import os
import shutil
import threading

import pytest

from effir.data import registry
from effir.data.registry import ChecksumMismatch, DataFile, DataFileMissing


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No mirror, an empty cache, downloads allowed."""
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFIR_DATA_DIR", str(tmp_path / "no-mirror"))
    monkeypatch.delenv("EFFIR_OFFLINE", raising=False)
    monkeypatch.delenv("EFFIR_DATA_URL_BASE", raising=False)
    return tmp_path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www (a mirror layout); yields (root, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _synthetic(root, path="someone/repo/0123abc/data/file.json", payload=None):
    payload = payload if payload is not None else os.urandom(3001)  # fresh random bytes, odd size
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload)
    f = DataFile(path=path, url=f"https://raw.githubusercontent.com/{path}", sha256=hashlib.sha256(payload).hexdigest(),
                 size=len(payload), dataset="synthetic", role="train-mono", langs=("en",), licence="test")
    return f, payload


def test_manifest_matches_shared(data_dir):
    shared = list(csv.DictReader(open(data_dir.parent / "MANIFEST.tsv", encoding="utf-8"), delimiter="\t"))
    ours = registry.files()
    assert len(ours) == len(shared) == 61
    three = {"ara": "ar", "eng": "en", "cmn": "zh", "deu": "de", "ell": "el", "hin": "hi", "rus": "ru",
             "spa": "es", "tha": "th", "tur": "tr", "vie": "vi"}
    for f, row in zip(ours, shared):
        assert "github/" + f.path == row["local_path"]
        assert (f.url, f.sha256, f.size, f.licence) == (row["url"], row["sha256"], int(row["bytes"]), row["license"])
        assert (f.dataset or "-") == row["dataset"] and f.role == row["role"]
        assert f.langs == (() if row["langs"] == "-" else tuple(three.get(x, x) for x in row["langs"].split(",")))
        assert f.url == "https://raw.githubusercontent.com/" + f.path


def test_files_filters_and_errors():
    xq = registry.files("xquad-r")
    assert len(xq) == 11 and sorted(lang for f in xq for lang in f.langs) == sorted(
        "ar de el en es hi ru th tr vi zh".split())
    assert len(registry.files("mlqa-r")) == 7
    assert {f.dataset for f in registry.files(role="train-mono")} == {"tquad", "arcd", "cmrc2018", "iapp-wiki-qa"}
    assert all(f.dataset is None for f in registry.files(role="licence/readme"))
    assert {f.langs for f in registry.files("tatoeba")} >= {("en",), ("zh",)}
    with pytest.raises(ValueError, match="dataset must be one of"):
        registry.files("xquad")
    with pytest.raises(ValueError, match="role must be one of"):
        registry.files(role="training")
    f = xq[0]
    assert registry.get(f.url) == registry.get("github/" + f.path) == registry.get(f.path) == f
    with pytest.raises(ValueError, match="registered path or URL"):
        registry.fetch("nobody/nothing/0/x.json")
    with pytest.raises(ValueError, match="DataFile"):
        registry.fetch(3)


def test_fetch_from_mirror_and_verified_cache(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    f = registry.files("tquad")[0]
    path = registry.fetch(f)
    assert path == data_dir / f.path and path.stat().st_size == f.size
    # The second look is a stat, not a hash.
    monkeypatch.setattr(registry, "_sha256_file", lambda p: pytest.fail("re-hashed a verified file"))
    assert registry.fetch(f.path) == path


def test_download_from_local_http_server(isolated, server, monkeypatch):
    root, base = server
    f, payload = _synthetic(root)
    monkeypatch.setenv("EFFIR_DATA_URL_BASE", base)
    path = registry.fetch(f)
    assert path == isolated / "cache" / "data" / f.path
    assert path.read_bytes() == payload
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]  # temp file renamed away
    # Now served from the cache, even offline and with the server's copy gone.
    (root / f.path).unlink()
    monkeypatch.setenv("EFFIR_OFFLINE", "1")
    assert registry.fetch(f) == path


def test_download_registered_file_with_url_base(isolated, server, data_dir):
    root, base = server
    f = registry.get("github/TQuad/turkish-nlp-qa-dataset/3bece60f62569182476fe00683793745ba92c32e/README.md")
    (root / f.path).parent.mkdir(parents=True)
    shutil.copy(data_dir / f.path, root / f.path)
    path = registry.fetch(f, url_base=base + "/", timeout=10)
    assert path.read_bytes() == (data_dir / f.path).read_bytes()
    assert str(isolated / "cache") in str(path)


def test_download_checksum_mismatch(isolated, server, monkeypatch):
    root, base = server
    f, payload = _synthetic(root)
    (root / f.path).write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # same size, one bit flipped
    monkeypatch.setenv("EFFIR_DATA_URL_BASE", base)
    with pytest.raises(ChecksumMismatch) as err:
        registry.fetch(f)
    assert f.path in str(err.value) and base in str(err.value) and f.url in str(err.value)
    cache = isolated / "cache" / "data" / f.path
    assert not cache.exists() and not list(cache.parent.glob("*.part"))


def test_download_missing_and_offline(isolated, server, monkeypatch):
    root, base = server
    f, _ = _synthetic(root)
    (root / f.path).unlink()
    with pytest.raises(DataFileMissing) as err:  # HTTP 404
        registry.fetch(f, url_base=base)
    assert f.path in str(err.value) and f"{base}/{f.path}" in str(err.value)
    monkeypatch.setenv("EFFIR_OFFLINE", "1")
    with pytest.raises(DataFileMissing) as err:
        registry.fetch(f)
    assert "EFFIR_OFFLINE" in str(err.value) and f.url in str(err.value) and f.path in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_cached_file_changed_after_verification(isolated, server, monkeypatch):
    root, base = server
    f, payload = _synthetic(root)
    path = registry.fetch(f, url_base=base)
    path.write_bytes(payload + b"x")  # size changes
    with pytest.raises(ChecksumMismatch, match="size"):
        registry.fetch(f, url_base=base)
    path.write_bytes(bytes(reversed(payload)))  # same size, new content, new mtime
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChecksumMismatch, match="sha256") as err:
        registry.fetch(f, url_base=base)
    assert f.url in str(err.value)


def test_mirror_layout_via_env(tmp_path, monkeypatch):
    """EFFIR_DATA_DIR may point at the folder holding github/ or at github/ itself."""
    f, payload = _synthetic(tmp_path / "m" / "github")
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFIR_OFFLINE", "1")
    for d in (tmp_path / "m", tmp_path / "m" / "github"):
        monkeypatch.setenv("EFFIR_DATA_DIR", str(d))
        assert registry.fetch(f).read_bytes() == payload

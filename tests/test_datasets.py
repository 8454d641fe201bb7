"""kdens.datasets: the real download code against an HTTP server on 127.0.0.1, never the internet.

The fake "MNIST" is four tiny IDX files made here; the module's hash table is swapped for
theirs, so no real MNIST is needed. Every test asserts what the cache holds afterwards:
the verified files after a success, nothing at all (no partial or temp file) after a failure.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from kdens import data as D
from kdens import datasets
from kdens.errors import DataError

STEMS = list(datasets.IDX_FILES.values())


def _idx(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def _fake_idx() -> dict[str, bytes]:
    """Four tiny IDX files: 40 train / 10 test 4x4 images, labels 0..9."""
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (40, 4, 4))),
        "train-labels-idx1-ubyte": _idx(np.arange(40) % 10),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (10, 4, 4))),
        "t10k-labels-idx1-ubyte": _idx(np.arange(10)),
    }


FAKE = _fake_idx()
FAKE_SHA = {stem: hashlib.sha256(raw).hexdigest() for stem, raw in FAKE.items()}


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a temp folder; ``hits`` lists the paths requested.

    Paths in ``short`` get a Content-Length 1000 bytes larger than the file (the body then
    stops early, as on a dropped connection).
    """
    www = tmp_path / "www"
    www.mkdir()
    hits: list[str] = []
    short: set[str] = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def send_header(self, keyword, value):
            if keyword == "Content-Length" and self.path in short:
                value = str(int(value) + 1000)
            super().send_header(keyword, value)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", www=www, hits=hits, short=short)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Every test: an empty cache under tmp_path, fake hashes, and no public mirror reachable.

    The default mirrors point at a closed local port, so a test that forgot KDENS_MIRROR
    fails fast instead of reaching the internet; the Debian folder is absent.
    """
    monkeypatch.setenv("KDENS_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("KDENS_MIRROR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(datasets.SHA256, "mnist", dict(FAKE_SHA))
    monkeypatch.setitem(datasets.SHA256, "fashion-mnist", dict(FAKE_SHA))
    monkeypatch.setitem(datasets.MIRRORS, "mnist", ("http://127.0.0.1:9/mnist/",))
    monkeypatch.setitem(datasets.MIRRORS, "fashion-mnist", ("http://127.0.0.1:9/fashion-mnist/",))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "no-debian")
    return tmp_path / "cache"


def _serve(server, name: str, files: dict[str, bytes] | None = None, sub: str | None = None) -> None:
    folder = server.www / (sub or name)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, raw in (FAKE if files is None else files).items():
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_caches_loads_and_is_not_repeated(server, offline, monkeypatch, capsys):
    _serve(server, "mnist")
    monkeypatch.setenv("KDENS_MIRROR", server.url + "/")
    ds = D.load_dataset("mnist")
    assert ds.name == "mnist" and ds.input_shape == (1, 4, 4) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_val) == 40 and len(ds.y_test) == 10
    assert sorted(server.hits) == sorted(f"/mnist/{stem}.gz" for stem in STEMS)
    # the cache holds the four decompressed, verified files and nothing else
    assert _all_files(offline) == ["mnist"] + sorted(f"mnist/{stem}" for stem in STEMS)
    for stem in STEMS:
        assert (offline / "mnist" / stem).read_bytes() == FAKE[stem]
    err = capsys.readouterr().err
    assert err.count("kdens: downloading") == 4 and "verified" in err
    again = D.load_dataset("mnist")
    assert len(server.hits) == 4  # served from the cache
    assert again.fingerprint == ds.fingerprint


def test_corrupt_download_is_refused_and_leaves_nothing(server, offline, monkeypatch):
    bad = dict(FAKE)
    bad["t10k-images-idx3-ubyte"] = FAKE["t10k-images-idx3-ubyte"][:-1] + b"\x01"  # same length, one byte off
    _serve(server, "mnist", bad)
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist")
    msg = str(e.value)
    assert f"{server.url}/mnist/t10k-images-idx3-ubyte.gz" in msg and "sha256" in msg
    assert "KDENS_DATA" in msg and "KDENS_MIRROR" in msg
    assert _all_files(offline) == []  # not even the three good files: all or nothing


def test_truncated_gzip_is_refused(server, offline, monkeypatch):
    _serve(server, "mnist")
    p = server.www / "mnist" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated gzip"):
        D.load_dataset("mnist")
    assert _all_files(offline) == []


def test_short_body_is_refused(server, offline, monkeypatch):
    _serve(server, "mnist")
    server.short.add("/mnist/train-labels-idx1-ubyte.gz")
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*(short read|IncompleteRead)"):
        D.load_dataset("mnist")
    assert _all_files(offline) == []


def test_404_names_file_url_and_fix(server, offline, monkeypatch):
    monkeypatch.setenv("KDENS_MIRROR", server.url + "/")
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist")
    msg = str(e.value)
    assert f"{server.url}/mnist/train-images-idx3-ubyte.gz (HTTP 404" in msg
    assert f"{offline / 'mnist'}/" in msg and "KDENS_MIRROR" in msg
    assert server.hits == ["/mnist/train-images-idx3-ubyte.gz"]
    assert _all_files(offline) == []


def test_default_mirrors_tried_in_order(server, offline):
    """Without KDENS_MIRROR the mirror list is used; a mirror that 404s falls through to the next."""
    _serve(server, "mnist", sub="second")
    datasets.MIRRORS["mnist"] = (server.url + "/first/", server.url + "/second/")  # restored by monkeypatch
    raws = datasets.fetch("mnist")
    assert {stem: raw for stem, (raw, _) in raws.items()} == FAKE
    assert server.hits[:2] == ["/first/train-images-idx3-ubyte.gz", "/second/train-images-idx3-ubyte.gz"]


def test_kdens_mirror_is_the_only_source(server, offline, monkeypatch):
    _serve(server, "mnist", sub="first")
    datasets.MIRRORS["mnist"] = (server.url + "/first/",)
    monkeypatch.setenv("KDENS_MIRROR", server.url + "/elsewhere")
    with pytest.raises(DataError, match="elsewhere/mnist/train-images"):
        D.load_dataset("mnist")
    assert all(h.startswith("/elsewhere/mnist/") for h in server.hits)


def test_kdens_data_files_are_used_and_checked(server, offline, monkeypatch, tmp_path):
    own = tmp_path / "own"
    (own / "mnist").mkdir(parents=True)
    for i, stem in enumerate(STEMS):  # plain and .gz both count
        target = own / "mnist" / (stem + (".gz" if i % 2 else ""))
        target.write_bytes(gzip.compress(FAKE[stem]) if i % 2 else FAKE[stem])
    monkeypatch.setenv("KDENS_DATA", str(own))
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    assert D.load_dataset("mnist").num_classes == 10
    assert server.hits == [] and not offline.exists()
    # a wrong file under the dataset's name is refused by name, not replaced or trained on
    (own / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros(40))))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: sha256 .* pass its folder to --data"):
        D.load_dataset("mnist")
    assert server.hits == []


def test_partial_cache_fetches_only_what_is_missing(server, offline, monkeypatch):
    (offline / "mnist").mkdir(parents=True)
    (offline / "mnist" / "train-images-idx3-ubyte").write_bytes(FAKE["train-images-idx3-ubyte"])
    _serve(server, "mnist")
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    datasets.fetch("mnist")
    assert sorted(server.hits) == sorted(f"/mnist/{s}.gz" for s in STEMS if s != "train-images-idx3-ubyte")


def test_fashion_mnist_reads_debian_folder_before_downloading(server, offline, monkeypatch, tmp_path):
    debian = tmp_path / "debian"
    debian.mkdir()
    for stem, raw in FAKE.items():
        (debian / f"{stem}.gz").write_bytes(gzip.compress(raw))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", debian)
    monkeypatch.setenv("KDENS_MIRROR", server.url)
    ds = D.load_dataset("fashion-mnist")
    assert ds.class_names[9] == "Ankle boot" and server.hits == [] and not offline.exists()
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="fashion-mnist/train-images.*apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")


def test_install_copies_verified_files(offline, tmp_path):
    src = tmp_path / "npm"
    src.mkdir()
    for stem, raw in FAKE.items():
        (src / stem).write_bytes(raw)
    written = datasets.install("mnist", src)
    assert sorted(p.name for p in written) == sorted(STEMS)
    assert _all_files(offline) == ["mnist"] + sorted(f"mnist/{stem}" for stem in STEMS)
    (src / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.ones(10)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: sha256"):
        datasets.install("mnist", src, root=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_cli_404_exits_2_with_one_line(server, offline, monkeypatch, tmp_path):
    from kdens.app.cli import cli

    monkeypatch.setenv("KDENS_MIRROR", server.url)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "mnist", "--model", "mlp", "--epochs", "1",
                                 "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "train-images-idx3-ubyte" in lines[0]
    assert not out.exists() and _all_files(offline) == []

"""The weight cache and resumable downloads, against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from medfm.cli import main
from medfm.errors import WeightsError
from medfm.models import hub
from medfm.models.registry import get_entry

PAYLOAD = np.random.default_rng(42).bytes(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    """A running local server: its base URL and the (path, Range header, status) of every request."""

    base: str
    log: list[tuple[str, str | None, int]] = field(default_factory=list)

    def url(self, name: str = "w.bin") -> str:
        return f"{self.base}/{name}"


def make_handler(content: bytes, honour_range: bool, log: list[tuple[str, str | None, int]]) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            wanted = self.headers.get("Range")
            if self.path.split("?")[0] != "/w.bin":
                log.append((self.path, wanted, 404))
                self.send_error(404, "Not Found")
                return
            match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
            if honour_range and match:
                start = int(match.group(1))
                if start >= len(content):
                    log.append((self.path, wanted, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(content)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = content[start:]
                log.append((self.path, wanted, 206))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                body = content
                log.append((self.path, wanted, 200))
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # keep the test output quiet
            pass

    return Handler


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """An empty cache in tmp_path, no proxies, and any connection away from 127.0.0.1 fails the test."""
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", urllib.request.build_opener(urllib.request.ProxyHandler({})))
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


def serve(honour_range: bool, content: bytes = PAYLOAD) -> Iterator[Server]:
    log: list[tuple[str, str | None, int]] = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(content, honour_range, log))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", log)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[Server]:
    """Serves PAYLOAD at /w.bin and honours ``Range: bytes=N-`` with 206."""
    yield from serve(honour_range=True)


@pytest.fixture
def rangeless_server() -> Iterator[Server]:
    """Serves PAYLOAD at /w.bin and always answers 200 with the whole file."""
    yield from serve(honour_range=False)


def spec_for(server: Server, sha256: str | None = SHA, size: int | None = len(PAYLOAD)) -> hub.WeightsSpec:
    return hub.WeightsSpec(filename="w.torch", url=server.url(), sha256=sha256, size=size)


def test_download_lands_in_cache(server, tmp_path):
    spec = spec_for(server)
    path = hub.download(spec, progress=False)
    assert path == tmp_path / "home" / "weights" / "w.torch"
    assert path == hub.cached_path(spec)
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("w.torch.part").exists()
    assert server.log == [("/w.bin", None, 200)]
    assert hub.resolve(spec, "m") == path
    assert hub.sha256_of(path) == SHA


def test_download_resumes_part_file(server):
    spec = spec_for(server)
    dest = hub.cached_path(spec)
    dest.parent.mkdir(parents=True)
    half = len(PAYLOAD) // 2
    dest.with_name("w.torch.part").write_bytes(PAYLOAD[:half])
    path = hub.download(spec, progress=False)
    assert server.log == [("/w.bin", f"bytes={half}-", 206)]
    assert path.read_bytes() == PAYLOAD
    assert not dest.with_name("w.torch.part").exists()


def test_download_of_complete_part_file_answered_416(server):
    spec = spec_for(server)
    dest = hub.cached_path(spec)
    dest.parent.mkdir(parents=True)
    dest.with_name("w.torch.part").write_bytes(PAYLOAD)
    path = hub.download(spec, progress=False)
    assert server.log == [("/w.bin", f"bytes={len(PAYLOAD)}-", 416)]
    assert path.read_bytes() == PAYLOAD


def test_server_ignoring_range_still_gives_correct_file(rangeless_server):
    spec = spec_for(rangeless_server)
    dest = hub.cached_path(spec)
    dest.parent.mkdir(parents=True)
    half = len(PAYLOAD) // 2
    dest.with_name("w.torch.part").write_bytes(PAYLOAD[:half])
    path = hub.download(spec, progress=False)
    assert rangeless_server.log == [("/w.bin", f"bytes={half}-", 200)]
    assert path.read_bytes() == PAYLOAD
    assert not dest.with_name("w.torch.part").exists()


def test_wrong_sha256_leaves_nothing(server):
    spec = spec_for(server, sha256="0" * 64)
    with pytest.raises(WeightsError, match="SHA-256") as info:
        hub.download(spec, progress=False)
    assert SHA in str(info.value) and server.url() in str(info.value)
    dest = hub.cached_path(spec)
    assert not dest.exists()
    assert not dest.with_name("w.torch.part").exists()


@pytest.mark.parametrize("good", [True, False])
def test_sha256_prefix_is_verified(server, good):
    prefix = SHA[:8] if good else "deadbeef"
    spec = hub.WeightsSpec(filename="w.torch", url=server.url(), sha256_prefix=prefix)
    if good:
        assert hub.download(spec, progress=False).read_bytes() == PAYLOAD
    else:
        with pytest.raises(WeightsError, match="does not start with deadbeef"):
            hub.download(spec, progress=False)
        assert not hub.cached_path(spec).exists()


def test_wrong_size_leaves_nothing(server):
    spec = spec_for(server, sha256=None, size=len(PAYLOAD) + 1)
    with pytest.raises(WeightsError, match="size"):
        hub.download(spec, progress=False)
    dest = hub.cached_path(spec)
    assert not dest.exists()
    assert not dest.with_name("w.torch.part").exists()


def test_http_404_names_url(server):
    spec = hub.WeightsSpec(filename="w.torch", url=server.url("missing.bin"))
    with pytest.raises(WeightsError, match="HTTP 404") as info:
        hub.download(spec, progress=False)
    assert spec.url in str(info.value)
    assert not hub.cached_path(spec).exists()
    assert server.log == [("/missing.bin", None, 404)]


def test_existing_cached_file_is_verified_without_network(server):
    spec = spec_for(server)
    dest = hub.cached_path(spec)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    assert hub.download(spec, progress=False) == dest
    assert server.log == []
    dest.write_bytes(PAYLOAD[:-1])
    with pytest.raises(WeightsError, match="size"):
        hub.download(spec, progress=False)
    assert server.log == []


def test_resolve_missing_file_says_how_to_get_it(tmp_path):
    spec = hub.WeightsSpec(filename="model_weights.torch", url="https://example.org/w.torch", sha256=SHA)
    with pytest.raises(WeightsError) as info:
        hub.resolve(spec, "fmcib-resnet50")
    message = str(info.value)
    assert str(tmp_path / "home" / "weights" / "model_weights.torch") in message
    assert "https://example.org/w.torch" in message
    assert "medfm weights download fmcib-resnet50" in message
    assert SHA in message


def test_medfm_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDFM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.medfm_home() == tmp_path / "user" / ".cache" / "medfm"


def test_cli_weights_download(server, tmp_path, capsys):
    entry = get_entry("fmcib-resnet50")
    assert entry.weights is not None and entry.weights.sha256 is None
    assert main(["weights", "download", "fmcib-resnet50", "--url", server.url(), "--quiet"]) == 0
    path = tmp_path / "home" / "weights" / "model_weights.torch"
    assert path.read_bytes() == PAYLOAD
    out = capsys.readouterr().out
    assert f"fmcib-resnet50: {path} (SHA-256 {SHA})" in out
    assert server.log == [("/w.bin", None, 200)]

    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"fmcib-resnet50: {path} [cached]" in listing
    assert "resnet10-3d: no published weights" in listing


def test_cli_weights_download_404_is_one_line_error(server, capsys):
    url = server.url("nope.bin")
    assert main(["weights", "download", "fmcib-resnet50", "--url", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"medfm: error: download of {url} failed: HTTP 404 Not Found"]


def test_cli_weights_download_model_without_weights(capsys):
    assert main(["weights", "download", "resnet10-3d", "--quiet"]) == 2
    assert "has no published weights" in capsys.readouterr().err


OTHER = np.random.default_rng(7).bytes(300_000)
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()


@pytest.fixture
def other_server() -> Iterator[Server]:
    """Serves OTHER (another file of the same size) at /w.bin: the host replaced its weights."""
    yield from serve(honour_range=True, content=OTHER)


def unpinned(server: Server) -> hub.WeightsSpec:
    """A spec without a published hash or size, as FMCIB, RadiologyNET, MoCo and SwAV are registered."""
    return hub.WeightsSpec(filename="w.torch", url=server.url())


def test_first_download_of_an_unpinned_file_records_its_hash(server):
    path = hub.download(unpinned(server), progress=False)
    record = json.loads(hub.pin_path(path).read_text())
    assert hub.pin_path(path) == path.with_name("w.torch.sha256.json")
    assert {k: record[k] for k in ("filename", "sha256", "size", "url")} == {
        "filename": "w.torch",
        "sha256": SHA,
        "size": len(PAYLOAD),
        "url": server.url(),
    }
    assert hub.resolve(unpinned(server), "m") == path  # the same file loads


def test_a_published_hash_needs_no_record(server):
    path = hub.download(spec_for(server), progress=False)
    assert not hub.pin_path(path).exists()


def test_a_later_download_that_differs_is_refused(server, other_server):
    path = hub.download(unpinned(server), progress=False)
    recorded = hub.pin_path(path).read_text()
    path.unlink()  # the weights are fetched again; the host now serves another file
    with pytest.raises(WeightsError) as info:
        hub.download(unpinned(other_server), progress=False)
    message = str(info.value)
    assert message.startswith(f"{path.with_name('w.torch.part')}: SHA-256 {OTHER_SHA} differs from {SHA}, recorded ")
    assert "--trust-new-hash" in message and "MEDFM_TRUST_NEW_HASH=1" in message
    assert not path.exists() and not path.with_name("w.torch.part").exists()
    assert hub.pin_path(path).read_text() == recorded  # the record is kept

    assert hub.download(unpinned(other_server), progress=False, trust_new_hash=True).read_bytes() == OTHER
    assert json.loads(hub.pin_path(path).read_text())["sha256"] == OTHER_SHA


def test_a_replaced_cached_file_is_refused_at_load(server, monkeypatch):
    monkeypatch.delenv("MEDFM_TRUST_NEW_HASH", raising=False)
    spec = unpinned(server)
    path = hub.download(spec, progress=False)
    path.write_bytes(OTHER)
    with pytest.raises(WeightsError, match=f"SHA-256 {OTHER_SHA} differs from {SHA}"):
        hub.resolve(spec, "m")
    monkeypatch.setenv("MEDFM_TRUST_NEW_HASH", "1")
    assert hub.resolve(spec, "m") == path
    assert json.loads(hub.pin_path(path).read_text())["sha256"] == OTHER_SHA
    monkeypatch.delenv("MEDFM_TRUST_NEW_HASH")
    assert hub.resolve(spec, "m") == path  # now the recorded file


def test_a_file_placed_by_hand_is_pinned_at_first_load(tmp_path):
    spec = hub.WeightsSpec(filename="hand.pt", url="https://example.org/hand.pt")
    path = hub.cached_path(spec)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert hub.resolve(spec, "m") == path
    assert json.loads(hub.pin_path(path).read_text())["sha256"] == SHA


def test_cli_trust_new_hash(server, other_server, tmp_path, capsys):
    path = tmp_path / "home" / "weights" / "model_weights.torch"
    assert main(["weights", "download", "fmcib-resnet50", "--url", server.url(), "--quiet"]) == 0
    path.unlink()
    capsys.readouterr()
    assert main(["weights", "download", "fmcib-resnet50", "--url", other_server.url(), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medfm: error: ") and "--trust-new-hash" in lines[0]
    assert not path.exists()
    args = ["weights", "download", "fmcib-resnet50", "--url", other_server.url(), "--trust-new-hash", "--quiet"]
    assert main(args) == 0
    assert path.read_bytes() == OTHER
    assert f"(SHA-256 {OTHER_SHA})" in capsys.readouterr().out


def test_sha256_is_recomputed_when_the_file_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    first = hub.sha256_of(path)
    path.write_bytes(b"two, longer")
    assert hub.sha256_of(path) == hashlib.sha256(b"two, longer").hexdigest() != first


def test_a_url_without_a_scheme_is_a_download_error(capsys):
    assert main(["weights", "download", "fmcib-resnet50", "--url", "not-a-url", "--quiet"]) == 2
    assert capsys.readouterr().err == "medfm: error: download of not-a-url failed: unknown url type: 'not-a-url'\n"

"""The weight cache and resumable downloads, against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
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

"""Downloads through a local HTTP server: cache, resume after a cut, sha256, errors, offline, lock.

No test touches the internet: rankseg_testing.file_server serves in-memory files on 127.0.0.1
and cuts, gates or refuses transfers on purpose.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rankseg_jax import download
from rankseg_testing.file_server import FileServer

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
PATH = "/files/weights.pth"


@pytest.fixture
def server():
    with FileServer({PATH: DATA}) as s:
        yield s


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSEG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANKSEG_JAX_OFFLINE", raising=False)
    return tmp_path / "cache"


def fetch(server, **kwargs):
    kwargs = {"progress": False, "backoff": 0.0, **kwargs}
    return download.fetch(server.url(PATH), "weights.pth", **kwargs)


def test_download_into_cache_then_reuse_without_a_request(server, cache):
    path = fetch(server)
    assert path == cache / "weights.pth"
    assert path.read_bytes() == DATA
    assert (cache / "weights.pth.sha256").read_text().split()[0] == hashlib.sha256(DATA).hexdigest()
    assert not (cache / "weights.pth.part").exists()
    assert fetch(server) == path
    assert server.gets[PATH] == 1


def test_cut_transfer_is_resumed_with_range_and_ends_bit_identical(server, cache):
    cut = 123_457
    server.cut[PATH] = cut
    waits = []
    path = fetch(server, sleep=waits.append)
    assert path.read_bytes() == DATA
    assert server.gets[PATH] == 2
    assert server.ranges == [(PATH, f"bytes={cut}-")]
    assert len(waits) == 1


def test_server_ignoring_range_restarts_the_file(server, cache):
    server.cut[PATH] = 1000
    server.ignore_range = True
    assert fetch(server).read_bytes() == DATA
    assert server.gets[PATH] == 2


def test_wrong_sha256_is_refused_and_the_partial_file_removed(server, cache):
    with pytest.raises(download.ChecksumError, match="expected 0000000000000000") as info:
        fetch(server, sha256="0" * 64)
    message = str(info.value)
    assert "\n" not in message and "partial file removed" in message
    assert not (cache / "weights.pth.part").exists()
    assert not (cache / "weights.pth").exists()


def test_a_published_sha256_prefix_is_accepted(server, cache):
    prefix = hashlib.sha256(DATA).hexdigest()[:8]
    assert fetch(server, sha256=prefix).read_bytes() == DATA
    with pytest.raises(ValueError, match="8 to 64 hex digits"):
        fetch(server, sha256="abc")


def test_404_is_one_line_naming_url_and_place(server, cache):
    with pytest.raises(download.DownloadError, match="HTTP 404") as info:
        download.fetch(server.url("/missing.pth"), "missing.pth", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert server.url("/missing.pth") in message and str(cache / "missing.pth") in message


def test_connection_refused_is_one_line_after_the_retries(cache):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    waits = []
    with pytest.raises(download.OfflineError, match="refused") as info:
        download.fetch(url, "w.pth", progress=False, retries=3, backoff=0.5, sleep=waits.append)
    message = str(info.value)
    assert "\n" not in message
    assert url in message and str(cache / "w.pth") in message and "3 tries" in message
    assert waits == [0.5, 1.0]  # exponential backoff between the tries


def test_offline_never_opens_a_socket(server, cache, monkeypatch):
    cached = fetch(server)
    monkeypatch.setenv("RANKSEG_JAX_OFFLINE", "1")

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened in offline mode")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert fetch(server) == cached  # a verified cached file needs no network
    with pytest.raises(download.OfflineError) as info:
        download.fetch(server.url("/other.npz"), "other.npz", label="other_weights")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("other_weights: not in the cache and RANKSEG_JAX_OFFLINE is set")
    assert server.url("/other.npz") in message and str(cache / "other.npz") in message


def test_truncated_cache_entry_is_refetched_or_refused_never_used(server, cache, monkeypatch):
    path = fetch(server)
    path.write_bytes(DATA[: len(DATA) // 2])  # a copy cut short after it was recorded
    monkeypatch.setenv("RANKSEG_JAX_OFFLINE", "1")
    with pytest.raises(download.ChecksumError, match="truncated or corrupted") as info:
        fetch(server)
    assert "\n" not in str(info.value) and server.url(PATH) in str(info.value)
    monkeypatch.delenv("RANKSEG_JAX_OFFLINE")
    assert fetch(server).read_bytes() == DATA
    assert server.gets[PATH] == 2


def test_a_file_placed_by_hand_is_recorded_then_checked(server, cache):
    cache.mkdir()
    (cache / "weights.pth").write_bytes(DATA)
    assert fetch(server).read_bytes() == DATA
    assert server.gets[PATH] == 0
    assert (cache / "weights.pth.sha256").exists()


def _wait_until(condition, what: str, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_two_processes_asking_for_one_file_download_it_once(server, cache):
    """Process A is held mid-transfer; B reports it waits on the lock; then both get the file."""
    gate = server.gate[PATH] = threading.Event()
    script = (
        "import sys; from rankseg_jax import download; "
        "print(download.fetch(sys.argv[1], 'weights.pth', progress=False))"
    )
    env = {**os.environ, "RANKSEG_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    run = lambda: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", script, server.url(PATH)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = run()
    try:
        _wait_until(lambda: server.gets[PATH] == 1, "the first download to start")
        second = run()
        try:
            lines = []
            while line := second.stderr.readline():
                lines.append(line)
                if "waiting for another process downloading" in line:
                    break
            assert lines and "waiting for another process" in lines[-1], lines
            gate.set()
            out_a, err_a = first.communicate(timeout=300)
            out_b, err_b = second.communicate(timeout=300)
        finally:
            second.kill()
    finally:
        gate.set()
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, (err_a, err_b)
    assert out_a.strip() == out_b.strip() == str(cache / "weights.pth")
    assert (cache / "weights.pth").read_bytes() == DATA
    assert server.gets[PATH] == 1


def test_a_partial_file_from_another_url_is_not_resumed(server, cache):
    cache.mkdir()
    (cache / "weights.pth.part").write_bytes(b"bytes of some other file")
    (cache / "weights.pth.part.url").write_text("http://elsewhere.invalid/weights.pth")
    assert fetch(server).read_bytes() == DATA
    assert server.ranges == []
    assert not (cache / "weights.pth.part.url").exists()

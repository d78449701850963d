"""A threaded HTTP file server on 127.0.0.1 for download tests: Range, cut transfers, 404, gates.

Why: the download code must survive the network (a cut half-way, a server that answers 404,
several processes asking at once) and no test may touch the internet. This server serves
in-memory files and can misbehave on purpose:

* ``Range: bytes=N-`` / ``bytes=N-M`` answered with 206 and ``Content-Range`` (416 past the end);
* ``cut[path] = n``: the next response for ``path`` announces the full ``Content-Length`` but
  closes the connection after ``n`` body bytes (one cut per entry, then the entry is removed);
* ``gate[path] = threading.Event()``: a GET for ``path`` sends its headers and half the body,
  then waits for the event before sending the rest (lets a test hold a download in flight);
* ``ignore_range``: answer 200 with the whole file even when a Range was asked.

``gets[path]`` counts GET requests and ``ranges`` lists every Range header received, so tests
assert how many downloads happened and that a resume asked for the right bytes.
"""

from __future__ import annotations

import collections
import http.server
import re
import socket
import threading

__all__ = ["FileServer"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FileServer:
    """``with FileServer({"/a.npz": data}) as server: server.url("/a.npz")``."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = dict(files or {})
        self.cut: dict[str, int] = {}
        self.gate: dict[str, threading.Event] = {}
        self.ignore_range = False
        self.gets: collections.Counter[str] = collections.Counter()
        self.ranges: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FileServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                server._answer(self, head=True)

            def do_GET(self):
                server._answer(self, head=False)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for event in self.gate.values():
            event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- one request --------------------------------------------------------------------------
    def _answer(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?", 1)[0]
        range_header = handler.headers.get("Range")
        with self._lock:
            if not head:
                self.gets[path] += 1
                if range_header:
                    self.ranges.append((path, range_header))
            data = self.files.get(path)
            cut = self.cut.pop(path, None) if not head else None
            gate = self.gate.get(path)
        if data is None:
            body = b"not found"
            handler.send_response(404)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if not head:
                handler.wfile.write(body)
            return
        start, end, status = 0, len(data) - 1, 200
        match = _RANGE.match(range_header or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            end = min(int(match.group(2)), end) if match.group(2) else end
            if start >= len(data) or start > end:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        handler.end_headers()
        if head:
            return
        if cut is not None:
            handler.wfile.write(body[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if gate is not None:
            half = len(body) // 2
            handler.wfile.write(body[:half])
            handler.wfile.flush()
            gate.wait()
            handler.wfile.write(body[half:])
            return
        handler.wfile.write(body)

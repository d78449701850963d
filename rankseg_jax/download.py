"""Downloads that survive the network: cache, resume, checksum, lock, offline mode.

Why: a paper row starts from a 300 MB-1.2 GB pretrained file. A user who starts eight
processes, loses the connection half-way, or runs on a TPU VM without internet must end up with
either the exact file or one line saying what to do, never with a half-loaded checkpoint.

How a file is fetched (:func:`fetch`):

* It lives at ``cache_dir() / filename`` (``$RANKSEG_JAX_CACHE``, default
  ``~/.cache/rankseg_jax``). While it is downloading it is ``filename + '.part'``; it is renamed
  only once complete and verified.
* ``filename + '.lock'`` is held with ``fcntl.flock`` for the whole fetch, so one process per
  machine downloads and the others wait, then find the file in the cache.
* A cut transfer (connection reset, body shorter than ``Content-Length``, a timeout) is retried
  with exponential backoff and resumed with an HTTP ``Range`` request from the bytes already in
  the ``.part`` file. A server that ignores ``Range`` (status 200) restarts the file.
* The sha256 is checked where the caller knows it (a full digest or a prefix of at least 8 hex
  digits, as in mmseg's ``name-e67eebb6.pth`` files). Otherwise it is recorded in
  ``filename + '.sha256'`` and checked on every later use, so a truncated or corrupted cache entry
  is found before anything reads it: it is downloaded again, or refused in one line when
  offline.
* Offline (``RANKSEG_JAX_OFFLINE=1``): no socket is opened; a missing file is one line naming
  the file, its URL and the exact path to put it at by hand. The same line ends a download that
  cannot reach the server at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pathlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from rankseg_jax.errors import UserError

__all__ = [
    "ChecksumError",
    "DownloadError",
    "OfflineError",
    "cache_dir",
    "fetch",
    "is_offline",
    "sha256_of",
]

CHUNK = 1 << 20
USER_AGENT = "rankseg_jax-download/1"
_HEX = set("0123456789abcdef")


class DownloadError(UserError, RuntimeError):
    """A weights file that cannot be downloaded or whose cached copy is unusable (one line)."""


class OfflineError(DownloadError):
    """The file is not in the cache and the network is off or unreachable."""


class ChecksumError(DownloadError):
    """A downloaded or cached file whose sha256 is not the expected one."""


class _Transient(Exception):
    """A failure worth retrying (connection reset, short body, 5xx, timeout)."""


def cache_dir() -> pathlib.Path:
    """``$RANKSEG_JAX_CACHE``, default ``~/.cache/rankseg_jax`` (not created here)."""
    return pathlib.Path(
        os.environ.get("RANKSEG_JAX_CACHE") or pathlib.Path.home() / ".cache" / "rankseg_jax"
    ).expanduser()


def is_offline() -> bool:
    """True when ``RANKSEG_JAX_OFFLINE`` is set to 1/true/yes/on."""
    return os.environ.get("RANKSEG_JAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def sha256_of(path: str | os.PathLike, start: hashlib._Hash | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a 1.2 GB file takes a few seconds)."""
    digest = start or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_expected(expected: str | None) -> str | None:
    if expected is None:
        return None
    expected = expected.strip().lower()
    if len(expected) < 8 or len(expected) > 64 or not set(expected) <= _HEX:
        raise ValueError(f"sha256 {expected!r}: give 8 to 64 hex digits")
    return expected


def _matches(actual: str, expected: str) -> bool:
    return actual.startswith(expected)


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hand_line(url: str, dest: pathlib.Path) -> str:
    return f"download {url} and place it at {dest}"


def _verify_cached(dest: pathlib.Path, expected: str | None) -> str | None:
    """Why the cached ``dest`` is unusable, or None when it is good (records a first sha256)."""
    actual = sha256_of(dest)
    if expected is not None:
        if not _matches(actual, expected):
            return f"sha256 {actual[:16]}... is not the expected {expected[:16]}..."
        if not _sidecar(dest).exists():
            _write_atomic(_sidecar(dest), actual + "\n")
        return None
    sidecar = _sidecar(dest)
    if sidecar.exists():
        recorded = next(iter(sidecar.read_text().split()), "")
        if recorded != actual:
            return (
                f"sha256 {actual[:16]}... differs from the {recorded[:16]}... recorded in "
                f"{sidecar.name} when it was downloaded (truncated or corrupted)"
            )
        return None
    _write_atomic(sidecar, actual + "\n")  # placed by hand: trust it once, check it from now on
    return None


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path, label: str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; say once on stderr when another process has it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"rankseg_jax: waiting for another process downloading {label} ({lock_path})",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _Progress:
    """tqdm when installed, else a percentage line on stderr every 5 %; nothing when disabled."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool):
        self.enabled, self.total, self.done, self.label = enabled, total, done, label
        self._bar = None
        self._last = -1
        if not enabled:
            return
        try:
            import tqdm  # optional: a nicer bar when it is installed
        except ImportError:
            return
        self._bar = tqdm.tqdm(
            total=total, initial=done, unit="B", unit_scale=True, desc=label, file=sys.stderr
        )

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total:
            percent = 100 * self.done // self.total
            if percent // 5 != self._last // 5:
                self._last = percent
                mb = self.done / 1e6
                print(f"{self.label}: {percent}% ({mb:.1f} MB)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _expected_total(response, start: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200), None if unknown."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range:
        size = content_range.rsplit("/", 1)[1].strip()
        return int(size) if size.isdigit() else None
    length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + (start if response.status == 206 else 0)


def _transfer(
    url: str,
    part: pathlib.Path,
    label: str,
    progress: bool,
    timeout: float,
) -> None:
    """One attempt: append the rest of the file to ``part``; raises _Transient on a cut."""
    start = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # our .part is already as long as (or longer than) the file
            part.unlink()
            raise _Transient("the server refused the resume range; restarting") from None
        if err.code >= 500 or err.code == 429:
            raise _Transient(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(
            f"{label}: HTTP {err.code} {err.reason} for {url}; "
            + _hand_line(url, part.with_name(part.name[: -len(".part")]))
        ) from None
    with response:
        if start and response.status != 206:  # the server ignored Range: start over
            start = 0
        total = _expected_total(response, start)
        bar = _Progress(label, total, start, progress)
        received = start
        try:
            with open(part, "ab" if start else "wb") as f:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
                        raise _Transient(f"transfer cut: {err!r}") from None
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and received != total:
        raise _Transient(f"transfer cut at {received} of {total} bytes")


def _unreachable(err: BaseException) -> bool:
    """A URLError that means 'no network / no server', not an HTTP answer."""
    return isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)


def fetch(
    url: str,
    filename: str,
    *,
    sha256: str | None = None,
    label: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> pathlib.Path:
    """The local path of ``filename`` in the cache, downloading it from ``url`` if needed.

    ``sha256``: the expected digest (full or a prefix of >= 8 hex digits) or None (recorded
    beside the file on first download and checked on every later call). ``label`` names the
    file in messages (a registry name). ``retries`` attempts in a row without progress, waiting
    ``backoff * 2**i`` seconds between them; an attempt that received bytes resets the count.
    Raises :class:`OfflineError`, :class:`ChecksumError` or :class:`DownloadError`, each with a
    one-line message.
    """
    expected = _check_expected(sha256)
    label = label or filename
    folder = pathlib.Path(cache) if cache is not None else cache_dir()
    dest = folder / filename
    part = dest.with_name(dest.name + ".part")
    hand = _hand_line(url, dest)
    if dest.is_file() and (problem := _verify_cached(dest, expected)) is None:
        return dest  # the common case: no lock, no network
    if is_offline():
        if dest.is_file():
            raise ChecksumError(f"{label}: cached {dest} is unusable: {problem}; offline: {hand}")
        raise OfflineError(f"{label}: not in the cache and RANKSEG_JAX_OFFLINE is set; {hand}")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock"), label):
        if dest.is_file():  # another process may have finished it while we waited
            problem = _verify_cached(dest, expected)
            if problem is None:
                return dest
            print(f"rankseg_jax: {label}: {dest} {problem}; downloading again", file=sys.stderr)
            dest.unlink()
            _sidecar(dest).unlink(missing_ok=True)
        source = part.with_name(part.name + ".url")  # a .part from another URL is not resumed
        if part.exists() and (not source.exists() or source.read_text() != url):
            part.unlink()
        _write_atomic(source, url)
        failures = 0
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _transfer(url, part, label, progress, timeout)
                break
            except _Transient as err:
                reason = str(err)
            except urllib.error.URLError as err:
                if not _unreachable(err):
                    raise
                reason = f"cannot reach the server ({err.reason})"
            except (ConnectionError, TimeoutError, http.client.HTTPException) as err:
                reason = f"{type(err).__name__}: {err}"
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures >= retries:
                raise OfflineError(f"{label}: {reason} after {retries} tries; {hand}") from None
            wait = backoff * 2 ** max(failures - 1, 0)
            print(f"rankseg_jax: {label}: {reason}; retrying in {wait:g} s", file=sys.stderr)
            sleep(wait)
        actual = sha256_of(part)
        if expected is not None and not _matches(actual, expected):
            part.unlink()
            source.unlink(missing_ok=True)
            raise ChecksumError(
                f"{label}: downloaded file has sha256 {actual[:16]}..., expected "
                f"{expected[:16]}... (partial file removed); the URL {url} serves another file"
            )
        _write_atomic(_sidecar(dest), actual + "\n")
        os.replace(part, dest)
        source.unlink(missing_ok=True)
    return dest


def url_filename(url: str) -> str:
    """A cache file name for an arbitrary URL: its last path part, prefixed with a URL hash."""
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"

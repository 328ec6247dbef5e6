"""Downloads for ``vibatch image sync``: file://, http:// and https://, resumable, bounded.

HTTP goes through urllib's default opener, which honours http_proxy, https_proxy and no_proxy
from the environment (a site squid), and verifies TLS certificates against the system's CAs.
A partial download is kept under its expected sha512 and resumed with a Range request; the digest
is computed while the bytes are written, so the file that is verified is the file that is
installed. Nothing here decides trust: the caller compares size and digest with the catalog.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Iterator, Optional

from ..errors import DownloadFailed, ImageRejected
from ..util import Deadline
from .progress import QUIET, Progress

CHUNK = 1 << 20
USER_AGENT = "vibatch-image-sync/1"


def normalize(url: str) -> str:
    """A local path becomes a file:// URL; URLs are kept as they are."""
    if "://" not in url:
        return "file://" + urllib.request.pathname2url(os.path.abspath(url))
    return url


def scheme(url: str) -> str:
    s = urllib.parse.urlsplit(url).scheme
    if s not in ("file", "http", "https"):
        raise DownloadFailed(f"{url}: unsupported URL scheme {s!r} (use file://, http:// or "
                             "https://)")
    return s


@contextlib.contextmanager
def _open(url: str, offset: int, timeout: float) -> Iterator[tuple[BinaryIO, int, Optional[int]]]:
    """(stream, offset it starts at, offset it says it ends at or None if unknown).

    The start is ``offset`` if the source resumed, else 0."""
    if scheme(url) == "file":
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DownloadFailed(f"{url}: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            start = offset if offset <= size else 0
            f.seek(start)
            yield f, start, size
        return
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        # a fresh opener each time: its ProxyHandler reads http(s)_proxy/no_proxy now
        resp = urllib.request.build_opener().open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:   # nothing after offset: the server's file is shorter
            yield _Empty(), offset, offset
            return
        raise DownloadFailed(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadFailed(f"{url}: {getattr(e, 'reason', e)}") from None
    with resp:
        start = 0
        if resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            if not crange.startswith(f"bytes {offset}-"):
                raise DownloadFailed(f"{url}: the server resumed at the wrong place ({crange!r})")
            start = offset
        length = resp.headers.get("Content-Length")
        yield resp, start, start + int(length) if length and length.isdigit() else None


class _Empty:
    def read(self, _n: int = -1) -> bytes:
        return b""


def fetch_bytes(url: str, limit: int, timeout: float) -> bytes:
    """A small document (a catalog), at most ``limit`` bytes."""
    with _open(url, 0, timeout) as (f, _, _end):
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise DownloadFailed(f"{url}: {e}") from None
    if len(data) > limit:
        raise DownloadFailed(f"{url}: larger than {limit} bytes; not a catalog")
    return data


def download(url: str, part: str, size: int, sha512: str, deadline: Deadline,
             timeout: float, what: str, progress: Progress = QUIET) -> str:
    """Fetch ``url`` into ``part`` (resuming what is there) and check it; return ``part``.

    A network failure keeps the partial file for the next attempt (DownloadFailed). A file of the
    wrong size or digest is deleted (ImageRejected): it never reaches the library.
    """
    h = hashlib.sha512()
    have = 0
    if os.path.exists(part):
        have = os.path.getsize(part)
        if have > size:
            os.unlink(part)
            have = 0
        else:
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
    if have < size:
        with _open(url, have, timeout) as (src, start, end):
            if start != have:   # the source does not resume: start over
                h, have = hashlib.sha512(), 0
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.truncate(have)
                out.seek(have)
                progress.start(f"downloading {what}", size)
                while True:
                    if deadline.expired():
                        raise DownloadFailed(f"{what}: {url}: not complete after "
                                             f"{deadline.seconds:g} s (images.download_timeout_s); "
                                             f"{have} of {size} bytes kept for the next sync")
                    try:
                        chunk = src.read(CHUNK)
                    except OSError as e:
                        raise DownloadFailed(f"{what}: {url}: interrupted after {have} of {size} "
                                             f"bytes ({e}); kept for the next sync") from None
                    if not chunk:
                        if end is not None and have < end:   # the connection ended early
                            raise DownloadFailed(f"{what}: {url}: interrupted after {have} of "
                                                 f"{size} bytes; kept for the next sync")
                        break
                    if have + len(chunk) > size:
                        _discard(part)
                        raise ImageRejected(f"{what}: {url} is larger than the catalog's "
                                            f"{size} bytes; not installed")
                    out.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    progress.update(have)
                progress.end(have)
    if have != size:
        _discard(part)
        raise ImageRejected(f"{what}: {url} is truncated: {have} of the catalog's {size} bytes; "
                            "not installed")
    digest = h.hexdigest()
    if digest != sha512:
        _discard(part)
        raise ImageRejected(f"{what}: {url} does not match the catalog's sha512 (expected "
                            f"{sha512[:16]}…, got {digest[:16]}…): swapped or corrupted on the "
                            "way; not installed")
    return part


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def resolve(base: str, ref: str) -> str:
    """A catalog entry's URL, relative to the catalog's own URL."""
    return urllib.parse.urljoin(base, ref)

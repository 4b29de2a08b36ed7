"""Reading one tar shard, bounded: what a shard from storage that others can write to may
cost a reader.

- Plain tar only: the bytes are read as an uncompressed tar stream (no gzip / bzip2 / xz
  detection), so a small compressed "shard" cannot expand to gigabytes. The builder writes
  plain tars; anything else fails as a bad shard.
- Every member's size is checked from its tar header before its data is read: one larger
  than the cap (format.member_cap: twice the raw image) makes the shard bad at once. Members
  that are not images of the dataset (other extensions, a second image under one key,
  links, folders) are passed over without being read into memory.
- While the bytes pass, they are counted and hashed: a shard longer than the size the
  manifest lists stops there, and at its end its SHA-256 is compared with the manifest's.
  A difference is a ShardMismatch naming both hashes, after the shard's samples were given
  out (the stream is not held back for it): the stream counts every sample of it as bad.

A transient storage error (stream.transient) reopens the shard after wait, 2 x wait, ...
seconds and goes on after the last sample given out, up to `retries` times in a row without
progress; the hash starts again with each reopening, since the read starts at byte 0.
"""
from __future__ import annotations

import hashlib
import logging
import tarfile
import time

import fsspec

from .format import IMAGE_EXTS, UNKNOWN_SIDE_MEMBER_BYTES
from ..artifacts.storage import options_for, redact

log = logging.getLogger(__name__)
_TRAILER_BYTES = 1 << 20  # past the tar's end marker without a manifest size: at most this much (record padding)

# errors that are answers (missing object, access denied), not failures of the transport
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# storage clients whose own exception classes are transport failures (connection, timeout,
# incomplete response) when they reach us after the client's retries
_CLIENT_PACKAGES = {"aiohttp", "aiobotocore", "botocore", "urllib3", "requests", "http", "gcsfs", "google"}


class BadShard(ValueError):
    """The shard's content is refused (not a storage failure: never retried)."""


class ShardMismatch(BadShard):
    """The shard's bytes are not those the manifest lists (SHA-256 or size)."""


def transient(exn: BaseException) -> bool:
    """Whether a storage error may go away on a retry: an OSError other than not-found /
    access-denied (s3fs raises those for server errors it gave up on), or a storage
    client's own error. Bad content (a corrupt or truncated tar) is not transient."""
    if isinstance(exn, (_PERMANENT, BadShard)):
        return False
    if isinstance(exn, OSError):
        return True
    return any(c.__module__.split(".")[0] in _CLIENT_PACKAGES for c in type(exn).__mro__)


def describe(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}"


class _Hashed:
    """The shard's byte stream as tarfile reads it, counted and SHA-256 hashed on the way;
    reading past `size` (the manifest's byte count) is a ShardMismatch."""

    def __init__(self, raw, size: int | None):
        self.raw, self.size, self.count, self.sha = raw, size, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise ShardMismatch(f"it holds more than the {self.size} bytes the manifest lists")
        self.sha.update(data)
        return data

    def finish(self, sha256: str) -> None:
        """Read what tarfile left after the end marker, then compare size and hash."""
        limit = self.count + _TRAILER_BYTES
        while self.read(1 << 20):  # with a manifest size, read() stops past it
            if self.size is None and self.count > limit:
                raise BadShard(f"more than {_TRAILER_BYTES} bytes follow the tar's end marker")
        if self.size is not None and self.count != self.size:
            raise ShardMismatch(f"it holds {self.count} bytes; the manifest lists {self.size}")
        if sha256 and self.sha.hexdigest() != sha256:
            raise ShardMismatch(f"its SHA-256 is {self.sha.hexdigest()}; the manifest lists {sha256}")


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _images(stream: _Hashed, cap: int, start: int):
    """(index, key, image bytes) of the tar's image samples from sample `start` on; the ones
    before it, and members that are not the dataset's images, are passed over unread."""
    index, last_key = 0, None
    with tarfile.open(fileobj=stream, mode="r|") as tar:  # "r|": a plain tar stream, no decompression
        for member in tar:
            tar.members.clear()  # stream mode keeps every header it saw: a tar of many empty members would pile up
            if member.size > cap:
                raise BadShard(f"member {member.name!r} is {member.size} bytes; at most {cap} are allowed "
                               "for an image of this dataset")
            key, ext = _key_ext(member.name)
            if not member.isreg() or ext not in IMAGE_EXTS or key == last_key:
                continue  # tarfile reads past its data (through the hash) on the way to the next header
            last_key = key
            if index >= start:
                yield index, key, tar.extractfile(member).read()
            index += 1


def read_shard(url: str, storage_options: dict | None = None, start: int = 0, retries: int = 0,
               wait: float = 1.0, *, cap: int = UNKNOWN_SIDE_MEMBER_BYTES, size: int | None = None,
               sha256: str = ""):
    """(index, key, image bytes) of the image samples of one plain tar shard, in order, from
    sample `start` on, read through fsspec (explicit storage options reach the filesystem)
    within the bounds of the module header: members over `cap` bytes, more bytes than
    `size`, or another SHA-256 than `sha256` ("" / None: not checked) raise BadShard.
    Transient storage errors are retried (see the header); other errors, and a transient
    one past its retries, are raised."""
    done, failures, failed_at = start, 0, -1
    while True:
        raw = None
        try:
            # compression=None: fsspec never infers a codec from the name either
            raw = fsspec.open(url, "rb", compression=None, **{**options_for(url), **(storage_options or {})}).open()
            stream = _Hashed(raw, size)
            for index, key, data in _images(stream, cap, done):
                yield index, key, data
                done = index + 1
            stream.finish(sha256)
            return
        except Exception as exn:
            if not transient(exn):
                raise
            failures = failures + 1 if done == failed_at else 1
            failed_at = done
            if failures > retries:
                raise
            delay = wait * 2 ** (failures - 1)
            log.warning("%s", redact(f"retrying {url} from sample {done} in {delay:g} s "
                                     f"(retry {failures} of {retries}) after a storage error: {describe(exn)}"))
            time.sleep(delay)
        finally:
            if raw is not None:
                try:
                    raw.close()
                except Exception:  # closing a broken connection may fail as well
                    pass

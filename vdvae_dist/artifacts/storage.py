"""Object storage through fsspec: one place that turns URLs into (filesystem, path),
writes objects atomically and turns storage errors into one clear error naming the URL.

Credentials and endpoints come from the standard variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS);
fsspec options without secrets (endpoint, region, profile, anonymous access, requester pays)
come from data.storage_options / train.storage_options. Secrets never appear in messages.
"""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_QUERY_VALUE = re.compile(r"=[^&]*")


def _redact_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    at = rest.rfind("@")  # the last one: a password may hold '@' (and '/') unencoded
    if at >= 0 and (":" in rest[:at] or "/" not in rest[:at]):  # user:pass@ or token@, not a path's '@'
        rest = "***@" + rest[at + 1:]
    if question:  # signed URLs and ?token= keep their secrets in the values
        rest += "?" + _QUERY_VALUE.sub("=***", query)
    if hash_:
        rest += "#***"
    return f"{scheme}://{rest}"


def redact(text: str) -> str:
    """`text` with every URL's secrets hidden: its user:password@ (`http://user:secret@host/x`
    -> `http://***@host/x`), its query values (presigned URLs, `?token=`) and its fragment:
    for anything printed, logged, recorded or stored."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def redact_all(value):
    """`redact` applied to every string inside dicts, lists and tuples (configs, summaries)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return value


# fsspec options per URL prefix, registered from the run's config (use_run_storage), so that
# every filesystem this process opens under data.shards or train.output is configured alike:
# the shard streams, checkpoints, exports, summaries and Ray Train's own storage.
_PREFIX_OPTIONS: dict[str, dict] = {}


def use_storage_options(prefix: str, options: Mapping[str, Any]) -> None:
    """Open every URL under `prefix` (a URL with a scheme) with these fsspec options."""
    if "://" in prefix and options:
        _PREFIX_OPTIONS[prefix.rstrip("/")] = dict(options)


def use_run_storage(cfg) -> None:
    """The run's storage options (data.storage_options, train.storage_options) for this process."""
    use_storage_options(cfg.data.shards, cfg.data.storage_options)
    use_storage_options(cfg.train.output, cfg.train.storage_options)


def options_for(url: str) -> dict:
    """The registered fsspec options of the longest prefix of `url` ({} for none)."""
    matches = [p for p in _PREFIX_OPTIONS if url == p or url.startswith(p + "/")]
    return dict(_PREFIX_OPTIONS[max(matches, key=len)]) if matches else {}


def to_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a URL; bare paths mean file://. Registered options of the URL's
    prefix apply, explicit ones win. fsspec re-creates cached filesystems after a fork, so
    every process gets its own connection pool."""
    return fsspec.core.url_to_fs(url, **{**options_for(url), **(storage_options or {})})


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


@contextmanager
def storage_errors(url: str):
    """Re-raise storage failures as ValueError naming the URL (never the credentials)."""
    try:
        yield
    except FileNotFoundError as e:
        raise ValueError(redact(f"{url}: not found (missing bucket, prefix or object): {e}")) from None
    except PermissionError as e:
        raise ValueError(redact(f"{url}: access denied; check the credentials and endpoint: {e}")) from None


def require_bucket(fs, path: str, url: str) -> None:
    """Object stores: fail fast on a missing bucket instead of creating one by accident."""
    if isinstance(fs, LocalFileSystem):
        return
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        raise ValueError(f"{redact(url)}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


def replace_file(path: str, data: bytes) -> None:
    """Local disk: write a temporary file, fsync it and rename it over `path`, so a reader
    never sees a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Object stores publish an object only when its upload completes; local files are
    replaced whole (replace_file)."""
    if isinstance(fs, LocalFileSystem):
        replace_file(path, data)
    else:
        fs.pipe_file(path, data)

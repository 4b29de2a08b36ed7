"""Build WebDataset shards + manifest.json from a dataset source into any fsspec URL.

Deterministic (same input and seed -> byte-identical shards for any number of workers:
fixed tar headers, fixed encoder settings, fixed samples per shard), parallel (a pool of
`workers` forked processes, each encoding and writing whole shards; forked so a large
in-memory source is shared, not pickled), resumable (each shard is published atomically,
so an existing shard is complete and is skipped on a re-run) and careful: a URL holding a
different dataset is refused without `force`. The manifest is written last. Whatever is
recorded (the command in the manifest, the source in the build plan) or shown (progress,
messages) has any user:password part of a URL removed.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from .. import __version__
from ..artifacts.storage import join, redact, require_bucket, storage_errors, to_fs, write_atomic
from .format import binarize_pixels, encode_image
from .manifest import BUILD_PLAN, MANIFEST, Manifest, ShardInfo, is_http, read_manifest, sample_key, shard_name
from .readers import Source
from .sources import config_source, open_source, validate_source

if TYPE_CHECKING:
    from ..config.schema import DataConfig

TAR_MEMBER_OVERHEAD = 1024  # header + average padding per member
_SOURCE: Source | None = None  # set in the parent before forking the workers


def _tar_bytes(samples: list[dict]) -> bytes:
    """One shard in memory. Fixed mtime, owner and mode (TarWriter's defaults are the
    clock and "bigdata"), so the bytes depend on the samples alone."""
    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0, user="", group="", mode=0o644) as tar:
        for sample in samples:
            tar.write(sample)
    return buf.getvalue()


def _prepared(src: Source, split: str, i: int, binarize: bool, seed: int) -> np.ndarray:
    img = src.image(src.splits[split][i])
    if binarize:  # static binarization: fixed by (seed, split, index)
        rng = np.random.default_rng([seed, ["train", "val", "test"].index(split), i])
        img = binarize_pixels(img, rng)
    return img


def _write_shard(task: dict) -> dict:
    src = _SOURCE
    assert src is not None
    samples = []
    for i in range(task["start"], task["end"]):
        img = _prepared(src, task["split"], i, task["binarize"], task["seed"])
        samples.append({"__key__": sample_key(task["split"], i), task["format"]: encode_image(img, task["format"])})
    data = _tar_bytes(samples)
    fs, root = to_fs(task["url"], task["storage_options"])
    with storage_errors(redact(task["url"])):
        write_atomic(fs, join(root, task["name"]), data)
    return {"name": task["name"], "split": task["split"], "samples": len(samples), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _existing_info(fs, root: str, task: dict) -> dict:
    data = fs.cat_file(join(root, task["name"]))
    return {"name": task["name"], "split": task["split"], "samples": task["end"] - task["start"],
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def samples_per_shard(src: Source, shard_bytes: int, fmt: str, binarize: bool, seed: int) -> int:
    """From the encoded size of (up to) the first 32 training images: deterministic."""
    n = min(32, len(src.splits["train"]))
    sizes = [len(encode_image(_prepared(src, "train", i, binarize, seed), fmt)) + TAR_MEMBER_OVERHEAD
             for i in range(n)]
    return max(1, int(shard_bytes // (sum(sizes) / n)))


def build(source: str, url: str, resolution: int, *, bits: int = 8, shard_bytes: int = 256 * 2**20,
          val: int = 0, test: int = 0, workers: int = 1, seed: int = 0, image_format: str = "png",
          binarize: bool = False, force: bool = False, command: str = "", storage_options: dict | None = None,
          progress: bool = True) -> Manifest:
    global _SOURCE
    if resolution < 1:
        raise ValueError(f"--resolution={resolution} is out of range; allowed: >= 1")
    if bits not in (1, 5, 8):
        raise ValueError(f"--bits={bits} is out of range; allowed: 8 | 5 (colour) or 1 (binary)")
    if workers < 1:
        raise ValueError(f"--workers={workers} is out of range; allowed: >= 1")
    if shard_bytes < 1:
        raise ValueError(f"--shard-size={shard_bytes} is out of range; allowed: > 0 bytes")
    fs, root = to_fs(url, storage_options)
    shown = redact(url)
    if is_http(fs):
        raise ValueError(f"--out={shown} is out of range: http(s) URLs are read-only; allowed: a path, file://, "
                         "s3:// or gs:// (serve the built folder over HTTP to stream it from there)")
    src = open_source(source, resolution, val, test, seed)
    per_shard = samples_per_shard(src, shard_bytes, image_format, binarize, seed)
    plan = {"dataset": src.name, "source": redact(source), "resolution": resolution, "bits": bits,
            "image_format": image_format, "binarize": binarize, "seed": seed, "samples_per_shard": per_shard,
            "splits": {k: len(v) for k, v in src.splits.items()}}
    with storage_errors(shown):
        _claim(fs, root, shown, plan, force)
        tasks = [{"split": split, "name": shard_name(split, k), "start": start, "end": min(start + per_shard, n),
                  "format": image_format, "binarize": binarize, "seed": seed, "url": url,
                  "storage_options": storage_options}
                 for split, n in plan["splits"].items()
                 for k, start in enumerate(range(0, n, per_shard))]
        existing = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()
        todo = [t for t in tasks if t["name"] not in existing]
        done = [_existing_info(fs, root, t) for t in tasks if t["name"] in existing]
        bar = tqdm(total=sum(t["end"] - t["start"] for t in tasks), unit="img", desc=f"shards -> {shown}",
                   disable=not progress, dynamic_ncols=True)
        bar.update(sum(d["samples"] for d in done))
        _SOURCE = src
        try:
            if workers == 1 or len(todo) <= 1:
                results = map(_write_shard, todo)
                for info in results:
                    done.append(info)
                    bar.update(info["samples"])
            else:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                    for info in pool.map(_write_shard, todo):
                        done.append(info)
                        bar.update(info["samples"])
        finally:
            _SOURCE = None
            bar.close()
        order = {t["name"]: k for k, t in enumerate(tasks)}
        shards = [ShardInfo(**d) for d in sorted(done, key=lambda d: order[d["name"]])]
        manifest = Manifest(dataset=src.name, resolution=resolution, channels=src.channels, bits=bits,
                            image_format=image_format, splits=plan["splits"], shards=shards, command=redact(command),
                            tool_version=__version__, seed=seed, extra={"binarized": binarize,
                                                                        "samples_per_shard": per_shard})
        write_atomic(fs, join(root, MANIFEST), manifest.to_json().encode())
    return manifest


def _claim(fs, root: str, url: str, plan: dict, force: bool) -> None:
    """Refuse to mix two datasets under one URL (`url`: as shown in messages); with force,
    clear the old one first."""
    require_bucket(fs, root, url)
    plan_path = join(root, BUILD_PLAN)
    old = json.loads(fs.cat_file(plan_path)) if fs.exists(plan_path) else None
    foreign = old is None and fs.exists(join(root, MANIFEST))
    if (old is not None and old != plan) or foreign:
        if not force:
            what = redact(old["source"]) if old else "an unknown dataset"
            raise ValueError(f"{url} already holds a different dataset (built from {what}); "
                             "choose another --out or pass --force to replace it")
        for path in fs.ls(root, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".tar") or name in (MANIFEST, BUILD_PLAN):
                fs.rm_file(path)
    if old != plan:
        write_atomic(fs, plan_path, json.dumps(plan, sort_keys=True).encode())


def verify(url: str, storage_options: dict | None = None) -> list[str]:
    """Problems found (empty when every shard matches the manifest's size, hash and count)."""
    manifest = read_manifest(url, storage_options)
    fs, root = to_fs(url, storage_options)
    problems = []
    with storage_errors(redact(url)):
        for s in manifest.shards:
            path = join(root, s.name)
            if not fs.exists(path):
                problems.append(f"{s.name}: missing")
                continue
            data = fs.cat_file(path)
            if len(data) != s.bytes:
                problems.append(f"{s.name}: {len(data)} bytes, manifest says {s.bytes}")
            if hashlib.sha256(data).hexdigest() != s.sha256:
                problems.append(f"{s.name}: SHA-256 differs from the manifest")
                continue
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                count = sum(1 for m in tar.getmembers() if m.isfile())
            if count != s.samples:
                problems.append(f"{s.name}: {count} samples, manifest says {s.samples}")
        for split, n in manifest.splits.items():
            got = sum(s.samples for s in manifest.shards_of(split))
            if got != n:
                problems.append(f"split {split}: shards hold {got} samples, manifest says {n}")
    return problems


def summary(url: str, storage_options: dict | None = None) -> str:
    m = read_manifest(url, storage_options)
    lines = [redact(f"{url}: {m.dataset}, {m.resolution}px, {m.channels} channel(s), {m.bits} bit, {m.image_format}"),
             redact(f"built by vdvae-dist {m.tool_version}: {m.command}")]  # older manifests may hold secrets
    for split, n in m.splits.items():
        shards = m.shards_of(split)
        size = sum(s.bytes for s in shards)
        lines.append(f"  {split:5s} {n:>10,} images in {len(shards):>5} shards, {size / 2**20:,.1f} MiB")
    return "\n".join(lines)


def ensure_shards(d: DataConfig, seed: int, log=print) -> None:
    """Build `d.shards` from `d.source` once, if it holds no manifest yet: what the training
drivers (`vdvae-dist train`, the Ray driver) do before any reader opens the shards."""
    validate_source(d.source)
    fs, root = to_fs(d.shards, d.storage_options)
    if fs.exists(join(root, MANIFEST)):
        return
    if is_http(fs):
        raise ValueError(redact(f"data.shards={d.shards!r}: no {MANIFEST} there, and http(s) URLs are read-only "
                                "(shards are not built there); build them elsewhere with `vdvae-dist shards build` "
                                "and serve that folder, manifest included"))
    source = config_source(d)
    # held out as in memory: val_fraction of the training items
    n = len(open_source(source, d.resolution, seed=seed, key="data.source").splits["train"])
    val = max(1, int(round(n * d.val_fraction)))
    log(redact(f"building shards of {source} at {d.shards} (once)"))
    build(source, d.shards, d.resolution, val=val, shard_bytes=d.shard_bytes, seed=seed,
          command=f"vdvae-dist train (data.source={d.source})", storage_options=d.storage_options)

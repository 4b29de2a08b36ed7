"""Data, read and written apart. The dataset layout (shards + manifest.json) is manifest.py,
which both sides use. Reading: stream.py (WebDataset shards from object storage),
shardread.py (one shard, within bounds), pipeline.py (what the trainers see), batches.py
(in-memory batches). Writing: shardwriter.py (build, verify, and ensure_shards, which only
the drivers call). Image sources for both: sources.py, readers.py; the image encoding:
format.py. Never imports the model."""

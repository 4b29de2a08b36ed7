"""Artifacts shared by training, evaluation and serving: object storage through fsspec
(storage.py), the layout of a run folder and its checkpoints (run_folder.py, the one
owner of those file names), EMA weight exports (weights.py) and image grids (images.py)."""

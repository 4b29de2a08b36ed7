"""Artifact I/O shared by training, evaluation and serving: object storage through fsspec,
exported EMA weights, image grids, local checkpoints, and the import of official ones."""

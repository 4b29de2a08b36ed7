"""The official implementations' checkpoints in our terms, for `vdvae-dist import`: their
hyperparameters and state-dict names translated (hparams.py) and a checkpoint turned into
our EMA export (importer.py). Tooling only: nothing in training or serving imports it."""

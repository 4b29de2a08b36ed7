"""Data: image sources and batch streams. Never imports the model."""

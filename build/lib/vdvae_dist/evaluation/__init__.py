"""Evaluation like the papers, from a run's EMA weights: the one evaluation pass (measures.py,
also run at the end of every training run), the ELBO and the importance-weighted bound with
standard errors, latent utilisation (latents.py), depth and temperature studies and their
figures (report.py, figures.py)."""
from .measures import Measures, Tally, measure
from .report import EvalSettings, evaluate_weights

__all__ = ["EvalSettings", "Measures", "Tally", "evaluate_weights", "measure"]

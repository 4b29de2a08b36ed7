"""Evaluation like the papers: the ELBO and the importance-weighted bound with standard
errors, latent utilisation, and depth and temperature studies, from a run's EMA weights."""
from .measures import Measures, Tally, measure
from .report import EvalSettings, evaluate_weights

__all__ = ["EvalSettings", "Measures", "Tally", "evaluate_weights", "measure"]

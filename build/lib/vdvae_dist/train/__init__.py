"""Training: the one loop (loop.py) for one process and every Ray worker, the update-rule
protocol and what both rules share (rule.py), its plain-torch implementation (torch_rule.py,
with ema.py), one step with its objective (step.py, objective.py), the official and our own
schedules (schedules.py), the initial weights (init.py), compiled blocks (compiled.py), what
a run publishes (publish.py), the console progress (progress.py) and `vdvae-dist train`
(local.py). Checkpoint files are named by artifacts/run_folder.py; the DeepSpeed rule is
engine/."""

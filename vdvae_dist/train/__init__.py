"""Training: the one loop (loop.py) for one process and every Ray worker, the update-rule
interface (rule.py) with its plain-torch implementation (torch_rule.py), the step and
batch placement (step.py), the objective, evaluation, checkpoint stores and progress."""

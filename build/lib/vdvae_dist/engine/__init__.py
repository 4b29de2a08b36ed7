"""DeepSpeed ZeRO as an update rule (train/rule.py's protocol): the rule (deepspeed_rule.py),
its config translation (config.py), the gradient-skipping hooks with their version guard
(hooks.py), the sharded EMA (sharded_ema.py) and ZeRO checkpoints (zero_checkpoint.py). The
only package that trains with DeepSpeed; importing it does not import deepspeed, building
a DeepSpeedRule does."""

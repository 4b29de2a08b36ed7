"""DeepSpeed ZeRO as an update rule: config translation (config.py), the gradient-skipping
hooks with their version guard (hooks.py), the sharded EMA (sharded_ema.py), checkpoints
(checkpoint.py) and the rule itself (rule.py). Importing this package does not import
deepspeed; building a DeepSpeedRule does."""

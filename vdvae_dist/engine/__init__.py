"""DeepSpeed engine adapter. Importing this package does not import deepspeed; the
adapter module does, when a distributed run builds it."""

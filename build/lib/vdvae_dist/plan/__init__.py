"""`vdvae-dist plan`, the memory planner: per-GPU model states under each ZeRO stage as the
pinned DeepSpeed allocates them (memory_states.py), activation memory per checkpointing
mode measured on real or fake tensors (memory_activations.py, live_memory.py), and the
plan that puts them together (memory_plan.py). Reads the model and DeepSpeed's settings;
nothing in training imports it."""

"""What several stages share and nothing else: where batches go (placement.py), how latent
noise is seeded (seeding.py), which precision a device computes in and its autocast
(precision.py), and connecting to Ray without hanging on a dead cluster (ray_connect.py).
Imports torch only; ray is imported by the one function that connects."""

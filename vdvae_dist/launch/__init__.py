"""Ray Train launch: the only package that imports ray.train."""

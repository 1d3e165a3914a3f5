"""Compute backends beyond the inline one (pipelines.dispatch): `ray`, the optional extra
forecaster[ray]. Only `pipelines.backends.ray` imports ray, and only when it is chosen."""

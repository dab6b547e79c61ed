"""The only package that imports ray: runtime, and (later) simulation tasks, Ray Data pair
streams, Ray Train training, Ray Tune search and recovery actors."""

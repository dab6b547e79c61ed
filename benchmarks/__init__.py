"""Benchmarks of cryoorient_ray: ``python -m benchmarks run NAME [--scale small|paper]``.

Not part of the default test run. See ``benchmarks/harness.py`` and docs/BENCHMARKS.md.
"""

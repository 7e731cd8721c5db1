"""Benchmarks for vtpm-driver: ``python -m bench [--quick] [--output FILE]``.

Speed targets live here (:mod:`bench.targets`), never as timed assertions in
the test suite. See bench/README.md for how to run and read the report.
"""

"""Builds the optional compiled data-path helper (actors/_udpio.c); metadata is in pyproject.toml.

``optional=True``: where no compiler or Python headers are available the build goes on without
it, and actors/udpio.py falls back to the pure-Python implementation.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("_firezone_relay_udpio", ["actors/_udpio.c"], optional=True)])

# Metadata lives in pyproject.toml; this shim keeps `python setup.py develop` working for older tools.
from setuptools import setup

setup()

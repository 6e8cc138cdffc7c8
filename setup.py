"""The package metadata lives in pyproject.toml; this file stays for tools that call setup.py."""

from setuptools import setup

setup()

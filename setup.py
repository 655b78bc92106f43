"""Packages are discovered, never listed by hand (a hand list once shipped a wheel without
stages/ and losses/). Everything else is in pyproject.toml; this file exists only because
pyproject cannot combine discovery with the presets/ folder mapped to flatdino_cli.presets."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["flatdino_cli", "flatdino_cli.*"]) + ["flatdino_cli.presets"])

"""Bundled data: the default calibration text (see README.md in this folder)."""

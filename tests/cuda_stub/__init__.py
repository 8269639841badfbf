"""Stub CUDA libraries and programs for the CUDA probe's tests (see build.py)."""

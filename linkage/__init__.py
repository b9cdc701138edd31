"""Jigsaw linkage core."""

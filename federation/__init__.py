"""Jigsaw federation services."""

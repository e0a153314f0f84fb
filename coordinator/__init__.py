"""Coordinator: tokenizes, plans the split, drives generation through the stages, serves the public API."""

"""Serving hand-off: whether a serving engine can load a published adapter, and how to serve it."""

"""Tracing and coupling: model -> ATen graph -> dimension symbols -> coupled groups."""

"""Audit: where a model retrieves its knowledge, across a dataset."""

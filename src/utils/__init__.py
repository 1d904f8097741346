"""Helpers with no knowledge of the project's data or models."""

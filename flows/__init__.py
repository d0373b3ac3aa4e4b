"""Prefect flows: thin wiring of `gopd_core.pipeline` stages into tasks."""

"""Helpers run in subprocesses by the integration tests (scripts and callbacks named in configs)."""

"""Helpers shared by tests, benchmarks and the main job (tiny models, rank launchers)."""

"""The registry service: actors and their keys, benchmarks, models and datasets, and their lifecycle."""

"""The demo benchmark: breast cancer data split across three sites, models, preparator and evaluator images."""

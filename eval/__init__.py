"""Metrics, run comparison, reports, explanations and prediction."""

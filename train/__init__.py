"""Balancer and per-organ classifier fine-tuning under patient-grouped K-fold CV."""

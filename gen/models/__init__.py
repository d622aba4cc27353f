"""Neural networks of the generators: ``nn.Module`` s only (no training or sampling logic)."""

"""Layer 3: executions, the training loop and data."""

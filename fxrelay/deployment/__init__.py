"""Layer 2: inference graphs: inline leaves, strip no-ops, fold BatchNorm, exact BN statistics."""

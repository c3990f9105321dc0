"""Layer 1: the passes: trace, analyse, partition, split, heads, rewrite; import only core."""

"""Layer 2: pictures of a Plan with graphviz."""

"""Layer 0: the IR (Plan, Stage, Head) and the runtime that transformed models call; imports only torch."""

"""The names users choose from: one definition each, importable without torch (the command line's
``--help`` lists them before anything heavy is imported)."""

__all__ = ["MODES", "HEAD_KINDS", "BOUNDARIES", "BALANCES", "LEVELS", "FORMATS", "EXECUTIONS"]

MODES = ("relay", "greedy", "deep", "standard")
HEAD_KINDS = ("auto", "linear", "layercnn", "dgl", "downstream")
BOUNDARIES = ("auto", "pool", "blocks")
BALANCES = ("auto", "flops", "memory", "recompute")
LEVELS = ("stage", "node")
FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": None, ".gv": None}  # reason: suffix -> graphviz
EXECUTIONS = ("one-line", "recompute", "local", "sequential")  # reason: how a training step runs (fxrelay.train.executions)

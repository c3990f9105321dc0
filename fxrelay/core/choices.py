"""The names users choose from: one definition each, importable without torch (the command line's
``--help`` lists them before anything heavy is imported)."""

__all__ = ["MODES", "HEAD_KINDS", "BOUNDARIES", "BALANCES", "LEVELS", "FORMATS", "EXECUTIONS", "AUX_WEIGHTS", "default_aux_weight"]

MODES = ("relay", "greedy", "deep", "standard")
HEAD_KINDS = ("auto", "linear", "layercnn", "dgl", "downstream")
BOUNDARIES = ("auto", "pool", "blocks")
BALANCES = ("auto", "flops", "memory", "recompute")
LEVELS = ("stage", "node")
FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": None, ".gv": None}  # reason: suffix -> graphviz
EXECUTIONS = ("one-line", "recompute", "local", "sequential")  # reason: how a training step runs (fxrelay.train.executions)
# reason: in greedy a stage's only gradient is its head's, so the head's weight is that stage's learning
# rate: 1.0 trains every stage at the optimizer's rate (0.3 cut greedy's accuracy on generated shapes from
# 51.9 to 40.0%, docs/evidence.md); relay at 1.0 beat standard there; deep keeps GoogLeNet's 0.3
AUX_WEIGHTS = {"relay": 1.0, "greedy": 1.0, "deep": 0.3, "standard": 0.3}


def default_aux_weight(mode: str) -> float:
    """The aux heads' loss weight ``transform(aux_weight=None)`` uses for ``mode``.

    >>> default_aux_weight("greedy"), default_aux_weight("deep")
    (1.0, 0.3)
    """
    return AUX_WEIGHTS[mode]

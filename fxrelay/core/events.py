"""What happens to every model :func:`fxrelay.transform` makes: callbacks from the layers above.

The passes cannot import the training layer; a layer that must know each transformed model
(``fxrelay.train.guards``: the optimizer warnings) subscribes here when it is imported.

"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["on_transform", "transformed"]

_callbacks: list[Callable[[Any], None]] = []


def on_transform(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """Call ``callback(model)`` with every model transformed from now on (once per callback)."""
    if callback not in _callbacks:
        _callbacks.append(callback)
    return callback


def transformed(model: Any) -> None:
    """Tell every subscriber that ``model`` was just made by :func:`fxrelay.transform`."""
    for callback in list(_callbacks):
        callback(model)

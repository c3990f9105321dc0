"""Training checkpoints: the file (atomic write, safe load), what a resume must match, the random states.

A checkpoint is plain data (``torch.load(path, weights_only=True)`` reads it);
:meth:`~fxrelay.train.loop.Trainer.state_dict` fills it. Resuming restores every random
state a run draws from (torch, CUDA, Python, NumPy, the data loader's generators), so a
resumed run gives bitwise the weights of the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..passes.rewrite import is_transformed, plan_of
from .recipe import Recipe

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "plan_settings", "check_resumable",
           "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = "fxrelay-training-1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the previous checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :class:`~fxrelay.train.loop.Trainer`, loaded with ``weights_only=True`` onto the CPU.

    Raises:
        ValueError: the file is not a training checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not an fxrelay training checkpoint (it holds objects that only unsafe "
                         "unpickling loads)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an fxrelay training checkpoint")
    return state


def plan_settings(model: nn.Module) -> dict[str, Any] | None:
    """The transformed model's plan as plain data (None for a plain model): what a resume must match."""
    if not is_transformed(model):
        return None
    plan = plan_of(model)
    return {"model": plan.model_name, "mode": plan.mode, "boundaries": plan.boundaries,
            "stages": [[list(s.shape), s.reduction] for s in plan.stages],
            "heads": [[h.stage, h.span[0], h.span[1], h.weight, h.kind] for h in plan.heads]}


def check_resumable(state: dict[str, Any], model: nn.Module, recipe: Recipe, steps_per_epoch: int,
                    epochs: int) -> None:
    """Raise unless the checkpoint ``state`` continues a run of ``model`` with ``recipe``.

    Raises:
        ValueError: not a training checkpoint, written for a different plan, recipe or
            number of updates per epoch, or past ``epochs`` already.
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not an fxrelay training checkpoint (format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    _require_same("plan", state["plan"], plan_settings(model))
    _require_same("recipe", state["recipe"], dataclasses.asdict(recipe))
    _require_same("updates per epoch (batch size, dataset)", state["steps_per_epoch"], steps_per_epoch)
    if state["epoch"] > epochs:
        raise ValueError(f"the checkpoint has trained {state['epoch']} epochs, more than the {epochs} asked for")



def _require_same(what: str, stored: Any, current: Any) -> None:
    if stored == current:
        return
    if isinstance(stored, dict) and isinstance(current, dict):
        diff = ", ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                         for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k))
    else:
        diff = f"{stored!r} in the checkpoint, {current!r} now"
    raise ValueError(f"the checkpoint is from a run with a different {what} ({diff}); resume with the same "
                     "settings or start a new run")


def _generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch generators a loader draws from: its own, its sampler's, its batch sampler's."""
    found: dict[int, torch.Generator] = {}
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def rng_state(loader: Any) -> dict[str, Any]:
    """Every random state a run draws from, as plain data: torch, CUDA, Python, NumPy, ``loader``'s generators."""
    np = sys.modules.get("numpy")  # reason: a process that never imported NumPy has not drawn from it
    numpy_state = None
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": numpy_state,
        "loader": [g.get_state() for g in _generators(loader)],
    }


def set_rng_state(state: dict[str, Any], loader: Any) -> None:
    """Restore the random states :func:`rng_state` returned, ``loader``'s generators included.

    Raises:
        ValueError: ``loader`` draws from a different number of generators than the stored one.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, version, gauss = state["python"]
    random.setstate((kind, tuple(version), gauss))
    if state["numpy"] is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generators = _generators(loader)
    if len(generators) != len(state["loader"]):
        raise ValueError(f"the checkpoint holds {len(state['loader'])} data-loader generator states, the loader "
                         f"has {len(generators)} generators: build the loader as in the checkpointed run")
    for g, s in zip(generators, state["loader"]):
        g.set_state(s)


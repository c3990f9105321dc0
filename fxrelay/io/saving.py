"""Save and load models without unsafe unpickling: ``fxrelay.save`` / ``fxrelay.load``.

``torch.save(model)`` pickles code: ``torch.load`` refuses it under its default
``weights_only=True`` (``Unsupported global: ... reduce_graph_module``), and loading it
with ``weights_only=False`` runs whatever the file says. fxrelay writes two kinds of
files that need neither:

* **deployed** (or any plain) models, to a ``.pt2`` path: a ``torch.export`` program
  (:func:`torch.export.save`), with a dynamic batch size and the example's other
  dimensions. :func:`load` checks that every pickled part of the archive loads with
  ``weights_only=True`` before :func:`torch.export.load` (which would otherwise fall back to
  unsafe unpickling) and returns the program's module. Anyone can load it without
  fxrelay: ``torch.export.load(path).module()``.
* **trained** (transformed) models, to any other path (``.pt``): the state dict plus a
  :class:`ModelSpec` of plain values (the zoo model name and the transform settings), in a
  dict that ``torch.load(path, weights_only=True)`` reads. :func:`load` rebuilds the model
  from the recipe and loads the state dict with ``strict=True``: heads included, so
  training can go on. For a model of your own, the recipe's ``model`` is ``""`` and
  ``load(path, model=MyNet())`` applies the saved transform settings to your fresh instance.

Example:
    >>> import torch, fxrelay
    >>> recipe = fxrelay.ModelSpec("tv:resnet18", "relay", model_kwargs={"num_classes": 10},
    ...                         input_shape=(3, 64, 64))
    >>> model = recipe.build()                                  # then train it
    >>> path = fxrelay.save(model, "/tmp/r18_relay.pt", recipe=recipe)
    >>> again = fxrelay.load("/tmp/r18_relay.pt")              # strict: every tensor restored
    >>> x = torch.randn(2, 3, 64, 64)
    >>> torch.equal(again.eval()(x), model.eval()(x))
    True
    >>> deployed = fxrelay.deploy(model)
    >>> path = fxrelay.save(deployed, "/tmp/r18_relay.pt2")
    >>> torch.equal(fxrelay.load("/tmp/r18_relay.pt2")(x), deployed(x))
    True
"""

from __future__ import annotations

import dataclasses
import io
import warnings
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..core.plan import Plan
from ..passes.rewrite import is_transformed, plan_of, transform
from ..passes.tracing import default_example_input
from .zoo import load_model

__all__ = ["FORMAT", "EXPORT_SUFFIX", "ModelSpec", "save", "load"]

_RENAMED = {"ModelRecipe": "ModelSpec"}  # reason: deprecated names (training has the other recipe, Recipe)

FORMAT = "fxrelay.trained/1"
EXPORT_SUFFIX = ".pt2"
_PLAIN = (str, int, float, bool, type(None))
# reason: transform's aux_weight default until 2026-12-06; a file written before then records
# no heads, and rebuilding it with today's default (1.0 for relay and greedy) would train it differently
LEGACY_AUX_WEIGHT = 0.3


def _traced_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The per-sample shape fxrelay's analysis recorded on a GraphModule's single input, if any."""
    graph = getattr(model, "graph", None)
    inputs = [n for n in graph.nodes if n.op == "placeholder"] if isinstance(graph, torch.fx.Graph) else []
    info = inputs[0].meta.get("fxrelay") if len(inputs) == 1 else None
    return tuple(info.shape[1:]) if info is not None and info.shape else None


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a transformed model: plain values only, so a file can hold it safely.

    Attributes:
        model: a timm name or ``tv:NAME`` (see :mod:`fxrelay.io.zoo`); ``""`` for a model of
            your own, passed to :meth:`build` / :func:`load` as ``model=``.
        mode: the :func:`fxrelay.transform` mode.
        model_kwargs: the model constructor's arguments (``{"num_classes": 10}``).
        transform_kwargs: further :func:`fxrelay.transform` arguments (``{"window": 3}``);
            ``head_kind`` must be a name, not a factory.
        input_shape: per-sample example input shape (``(3, 32, 32)``); ``None``: the
            model's default.
    """

    model: str
    mode: str = "relay"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    transform_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None

    def build(self, model: nn.Module | None = None) -> nn.Module:
        """The transformed model, freshly initialised (in train mode).

        Args:
            model: the untransformed model when the recipe names none (``model=""``).

        Raises:
            ValueError: both or neither of ``model`` and ``self.model`` given, or a
                value :func:`fxrelay.transform` rejects.
        """
        if (model is None) == (not self.model):
            raise ValueError(f"ModelSpec(model={self.model!r}) needs model=... exactly when it names no zoo model")
        if model is None:
            model = load_model(self.model, **self.model_kwargs)
        example = torch.randn(1, *self.input_shape) if self.input_shape else None
        return transform(model.train(), self.mode, example_input=example, **self.transform_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a dict of plain values.

        Raises:
            ValueError: a value that is not a str, number, bool, None, or a list, tuple
                or str-keyed dict of those (a head factory, say).
        """
        values = dataclasses.asdict(self)
        _check_plain(values, "recipe")
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`."""
        shape = values.get("input_shape")
        return cls(**{**values, "input_shape": tuple(shape) if shape is not None else None})


def __getattr__(name: str) -> Any:
    """Deprecated names, with a warning naming the new one."""
    if name in _RENAMED:
        warnings.warn(f"fxrelay.{name} is renamed fxrelay.{_RENAMED[name]} (the training recipe is fxrelay's "
                      f"Recipe); use {_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save(model: nn.Module, path: str | Path, *, recipe: ModelSpec | None = None,
         example_input: torch.Tensor | None = None) -> Path:
    """Write ``model`` so that :func:`load` (and ``weights_only=True`` loading) reads it back.

    Args:
        model: a deployed or plain model for a ``.pt2`` path; a model from
            :func:`fxrelay.transform` (or :meth:`ModelSpec.build`) for any other path.
        path: the file; its folder is created.
        recipe: required for a transformed model: how :func:`load` rebuilds it.
        example_input: ``.pt2`` only: an input batch fixing every dimension but the batch
            size (default: the input shape fxrelay traced, else the model's default).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a transformed model to ``.pt2`` (deploy it first), a plain model to
            another suffix, or a missing or unstorable recipe, or one that does not rebuild
            the model's plan (stages, heads, windows, weights, kinds, mode, recompute, execution).
    """
    path = Path(path)
    if path.suffix == EXPORT_SUFFIX:
        if is_transformed(model):
            raise ValueError(f"{path}: a transformed model is saved with a ModelSpec to a .pt path; for "
                             f"a {EXPORT_SUFFIX} file deploy it first: fxrelay.save(fxrelay.deploy(model), ...)")
        program = _export(model, example_input)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, path)
        return path
    if not is_transformed(model):
        raise ValueError(f"{path}: a deployed or plain model is saved with torch.export to a {EXPORT_SUFFIX} path")
    if recipe is None:
        raise ValueError(f"{path}: saving a transformed model needs recipe=fxrelay.ModelSpec(model_name, mode, ...), "
                         "the settings load() rebuilds it from")
    values = recipe.to_dict()
    difference = _plan_difference(plan_of(model), plan_of(_rebuild(recipe, model)))
    if difference:
        raise ValueError(f"{path}: the recipe does not rebuild this model ({difference}); give the recipe the "
                         "mode and transform_kwargs the model was transformed with")
    payload = {"format": FORMAT, "recipe": values, "heads": _heads(plan_of(model)), "state_dict": model.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def _rebuild(recipe: ModelSpec, model: nn.Module) -> nn.Module:
    """What ``recipe`` builds; a recipe naming no zoo model is applied to ``model``'s traced graph."""
    if recipe.model:
        return recipe.build()
    traced = plan_of(model).graph_module
    training = traced.training
    try:
        return recipe.build(traced)
    finally:
        traced.train(training)


def _recompute(plan: Plan) -> bool:
    """Whether the model recomputes its stages in backward (``transform(recompute=True)``)."""
    return plan.recompute


def _heads(plan: Plan) -> list[list[Any]]:
    """The plan's heads as plain values: ``[stage, lo, hi, weight, kind]`` each."""
    return [[h.stage, *h.span, h.weight, h.kind] for h in plan.heads]


def _spec_of(payload: dict[str, Any]) -> ModelSpec:
    """The file's recipe; a file that records no heads predates the mode's aux weight default."""
    spec = ModelSpec.from_dict(payload["recipe"])
    if "heads" in payload or "aux_weight" in spec.transform_kwargs:
        return spec
    return dataclasses.replace(spec, transform_kwargs={**spec.transform_kwargs, "aux_weight": LEGACY_AUX_WEIGHT})


def _plan_difference(saved: Plan, rebuilt: Plan) -> str:
    """The first setting in which ``rebuilt`` differs from ``saved`` (``""``: none)."""
    if saved.mode != rebuilt.mode:
        return f"mode {saved.mode!r}, the recipe's {rebuilt.mode!r}"
    if _recompute(saved) != _recompute(rebuilt):
        return f"recompute {_recompute(saved)}, the recipe's {_recompute(rebuilt)}"
    if saved.execution != rebuilt.execution:
        return f"execution {saved.execution!r}, the recipe's {rebuilt.execution!r}"
    if [s.nodes for s in saved.stages] != [s.nodes for s in rebuilt.stages]:
        return f"{len(saved.stages)} stages, the recipe's {len(rebuilt.stages)} with other boundaries"
    heads = [[(h.stage, h.span, h.weight, h.kind) for h in p.heads] for p in (saved, rebuilt)]
    if heads[0] != heads[1]:
        return f"heads (stage, span, weight, kind) {heads[0]}, the recipe's {heads[1]}"
    return ""


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by :func:`save`, never unpickling anything but tensors and plain values.

    Args:
        path: a ``.pt2`` program or a trained-model file.
        model: for a trained model whose recipe names no zoo model: a fresh instance of
            the untransformed model.

    Returns:
        For ``.pt2``: the exported program's module (inference). Otherwise the transformed
        model in train mode, every parameter and buffer restored (``strict=True``).

    Raises:
        ValueError: not a file :func:`save` wrote, or a ``.pt2`` archive that needs unsafe
            unpickling.
    """
    path = Path(path)
    if path.suffix == EXPORT_SUFFIX:
        _check_safe_archive(path)
        return torch.export.load(path).module()
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a trained model written by fxrelay.save (no format {FORMAT!r})")
    built = _spec_of(payload).build(model)
    if "heads" in payload and _heads(plan_of(built)) != payload["heads"]:
        raise ValueError(f"{path}: the recipe rebuilds heads {_heads(plan_of(built))}, the file holds "
                         f"{payload['heads']} ([stage, lo, hi, weight, kind]); load it with the fxrelay that wrote it")
    built.load_state_dict(payload["state_dict"], strict=True)
    return built


def _export(model: nn.Module, example_input: torch.Tensor | None) -> torch.export.ExportedProgram:
    """``torch.export`` in eval mode with a dynamic batch size."""
    if example_input is None:
        shape = _traced_input_shape(model)
        example_input = torch.randn(2, *shape) if shape else torch.cat([default_example_input(model)] * 2)
    training = model.training
    try:
        return torch.export.export(model.eval(), (example_input,),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    finally:
        model.train(training)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for k, item in value.items():
            _check_plain(item, f"{where}.{k}")
        return
    raise ValueError(f"{where} = {value!r} cannot be stored safely: use str, int, float, bool, None, "
                     "or lists, tuples and str-keyed dicts of them (a head kind by name, not a factory)")


def _check_safe_archive(path: Path) -> None:
    """Every pickled part of a ``.pt2`` archive must load with ``weights_only=True``.

    reason: ``torch.export.load`` unpickles weights marked ``use_pickle`` and falls back
    to ``weights_only=False`` when a safe load fails; refuse such archives instead.
    """
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickled = {n for n in names if n.endswith(".pt")}
        for config in (n for n in names if n.endswith("_config.json")):
            entries = json.loads(archive.read(config)).get("config", {}).values()
            folder = config.rsplit("/", 1)[0]
            pickled |= {f"{folder}/{e['path_name']}" for e in entries if e.get("use_pickle")}
        for name in sorted(pickled):
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001  (reason: any failure here means unsafe or corrupt)
                raise ValueError(f"refusing to load {path}: its part {name!r} does not load with "
                                 f"weights_only=True ({type(e).__name__})") from None

"""Property-based suite: random small graphs, every mode, checked against independent references.

For each generated model (tests/graphgen.py) and each mode, with a random window,
heads and skip_first:

(a) ``fxrelay.partition`` and running its stages one after the other gives exactly
    the model's output;
(b) one training step's gradients (the one-line ``cross_entropy(model(x), y).backward()``)
    equal the independent oracle of tests/graph_oracle.py (relative 1e-6, float64);
(c) the transformed model's eval output equals the original model's (1e-12);
(d) ``fxrelay.deploy(model)`` equals the transformed model's eval output (1e-9).

Profiles (tests/conftest.py): ``ci`` (default; 300 graphs, derandomized) and ``long``
(5,000 graphs; ``--hypothesis-profile=long`` or ``FXRELAY_HYPOTHESIS_PROFILE=long``).

The suite found five bug classes before they were fixed (issue 10 bugs 1, 2, 3, 7 and a
size as a stage's last output); tests/test_reliability.py keeps a named regression test
for each.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch
import torch.fx as fx
from hypothesis import event, given, note
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import fxrelay
from graph_oracle import assert_grads_close, one_line_grads, reference_grads, run_stages
from graphgen import FEATURES, GraphCase, build, graphs

MODES = ("relay", "greedy", "deep", "standard")
CI_GRAPHS = graphs(FEATURES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # reason: these tensors are tiny; two threads on a busy 2-core machine make every conv ~20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def transform_options(data: st.DataObject, mode: str, num_stages: int) -> dict[str, Any]:
    """Random ``window``, ``heads`` (``"auto"`` or explicit stages), ``skip_first``, head kind, weight."""
    if mode == "standard":
        return {}
    explicit = st.lists(st.integers(0, num_stages - 2), min_size=1, max_size=3, unique=True).map(sorted)
    return {
        "window": data.draw(st.integers(1, 3), label=f"{mode} window"),
        "head_stages": data.draw(st.just("auto") | explicit if num_stages > 1 else st.just("auto"), label=f"{mode} heads"),
        "skip_first": data.draw(st.integers(0, 3), label=f"{mode} skip_first"),
        "head_kind": data.draw(st.sampled_from(["linear", "auto", "dgl"]), label=f"{mode} head"),
        "aux_weight": data.draw(st.sampled_from([0.3, 1.0]), label=f"{mode} aux_weight"),
    }


def _plain(value: Any) -> Any:
    """``value`` with fx's immutable containers (which ``plan.run_stages`` returns) as dict / list."""
    if isinstance(value, fx.immutable_collections.immutable_dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, fx.immutable_collections.immutable_list):
        return [_plain(v) for v in value]
    return value


def assert_outputs_close(got: Any, want: Any, rtol: float, what: str) -> None:
    """Same output structure, equal non-tensor leaves, tensor leaves within ``rtol`` of the largest value."""
    got_leaves, got_spec = tree_flatten(_plain(got))
    want_leaves, want_spec = tree_flatten(want)
    assert got_spec == want_spec, f"{what}: output structure {got_spec} != {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            assert g == w, f"{what}: {g!r} != {w!r}"
            continue
        assert type(g) is torch.Tensor and g.shape == w.shape, f"{what}: {type(g).__name__} {tuple(g.shape)}"
        error = (g - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
        assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def check_partition(model: nn.Module, x: torch.Tensor) -> fxrelay.Plan:
    """(a): the stages run one after the other give exactly the model's output."""
    plan = fxrelay.partition(model, example_input=x)
    assert_outputs_close(run_stages(plan, x), model(x), 0.0, "partition: run_stages vs model")
    return plan


def check_mode(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, options: dict[str, Any]) -> None:
    """(b), (c) and (d) for one mode; leaves ``model`` in train mode."""
    transformed = fxrelay.transform(model, mode, example_input=x, **options)
    note(f"{mode}: {fxrelay.plan_of(transformed)}")  # reason: printed with a failing example
    try:
        assert_grads_close(one_line_grads(transformed, x, y), reference_grads(transformed, x, y), transformed,
                           what=f"{mode}: ")
        transformed.eval()
        with torch.no_grad():
            out = transformed(x)
            assert_outputs_close(out, model.eval()(x), 1e-12, f"{mode}: eval output vs original")
            assert_outputs_close(fxrelay.deploy(transformed)(x), out, 1e-9, f"{mode}: deploy vs eval output")
    finally:
        model.train()


def check_graph(case: GraphCase, data: st.DataObject) -> None:
    """Every check for ``case``, with transform options drawn from ``data``."""
    model, x, y = build(case)
    plan = check_partition(model, x)
    event(f"stages: {len(plan.stages)}")
    for mode in MODES:
        check_mode(model, x, y, mode, transform_options(data, mode, len(plan.stages)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # reason: random graphs hit every warned-about corner
@given(case=CI_GRAPHS, data=st.data())
def test_random_graph(case: GraphCase, data: st.DataObject) -> None:
    check_graph(case, data)

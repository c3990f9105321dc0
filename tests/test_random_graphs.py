"""Differential property-based suite: random small graphs, every mode, every execution.

For each generated model (tests/graphgen.py) and each mode, with a random window,
heads and skip_first, and random step options (gradient accumulation over 2
micro-batches, CPU autocast, the dropout seed):

(a) ``fxrelay.partition`` and running its stages one after the other gives exactly
    the model's output;
(b) the one-line step's gradients equal the independent oracle of
    tests/graph_oracle.py (relative 1e-6, float64; not with dropout or autocast, whose
    masks / roundings the oracle's per-head forwards cannot reproduce);
(c) every other execution (tests/executions.py: recompute, ``LocalStep``, and for
    greedy the sequential step of every stage) gives the one-line step's losses,
    per-head logits, gradients and BatchNorm buffers (relative 1e-9 in float64; the
    sequential step: its stage's and head's gradients, the buffers of the stages it
    ran), or *refuses* with an error saying the fix; a refusal is counted, never skipped;
    under bfloat16 autocast, a gradient within 3e-2 of the one-line step's, or no further
    from the float64 step's than :data:`ROUNDING_FACTOR` times the one-line step's own
    bfloat16 error;
(d) the transformed model's eval output equals the original model's (1e-12) and
    ``fxrelay.deploy(model)`` equals the transformed model's (1e-9).

A 2-process ``StageParallel`` (one gloo group for 24 cases) runs in
:func:`test_stage_parallel_on_a_sample`. ``FXRELAY_DIFF_CASES`` sets the number of
cases (default 300, the CI profile of tests/conftest.py); ``test_random_graph_long``
(marked slow) runs ``FXRELAY_DIFF_CASES`` cases (default 5,000), records failures
instead of stopping, and writes a JSON report to ``FXRELAY_DIFF_REPORT`` every 100 cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import traceback
from collections import Counter
from dataclasses import replace
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import fxrelay
from fxrelay.train.sequential import StageStep
from executions import StepOptions, StepRecord, restore, run_step, snapshot, stage_parallel_step
from graph_oracle import max_rel_error, reference_grads, run_stages
from graphgen import FEATURES, GraphCase, build, graphs

MODES = ("relay", "greedy", "deep", "standard")
CI_GRAPHS = graphs(FEATURES)
CASES = int(os.environ.get("FXRELAY_DIFF_CASES", 0))
"""Cases per run (0: the profile's 300 for test_random_graph, 5,000 for test_random_graph_long)."""
EXACT, AUTOCAST = 1e-9, 3e-2
"""Relative tolerances between executions: float64; bfloat16 autocast (different summation orders)."""
ROUNDING_FACTOR = 4
"""Under autocast, an execution's gradient may also be as far from the float64 step's as this
many times the bfloat16 one-line step's (per tensor, largest element): each execution rounds its
own way (the one-line step adds the channels' bfloat16 cotangents before one pass, ``LocalStep``
runs a bfloat16 pass per channel and adds them in float32), and on a bias gradient summed over
every position of a tiny case, where the sum cancels, two such roundings differ by more than
3e-2 of the value (tests/test_diff_regressions.py: 3.4% and 5.2%, each execution's error the
same size as the other's)."""


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




def tracing_of(model: nn.Module) -> fxrelay.TracingConfig:
    """The tracing configuration keeping the case's leaf classes (graphgen's ``Pair``)."""
    return fxrelay.TracingConfig(leaf_modules=model.leaf_modules)


def check_partition(model: nn.Module, x: torch.Tensor) -> fxrelay.Plan:
    """(a): the stages run one after the other give exactly the model's output."""
    plan = fxrelay.partition(model, example_input=x, tracing=tracing_of(model))
    torch.manual_seed(0)  # reason: the same dropout masks in both forwards
    staged = run_stages(plan, x)
    torch.manual_seed(0)
    assert_outputs_close(staged, model(x), 0.0, "partition: run_stages vs model")
    return plan


def step_options(data: st.DataObject, case: GraphCase) -> StepOptions:
    """Random accumulation (1 or 2 micro-batches), autocast (one case in eight) and seed."""
    return StepOptions(micro_batches=data.draw(st.sampled_from([1, 1, 2]), label="micro_batches"),
                       autocast=data.draw(st.integers(0, 7), label="autocast") == 7, seed=case.seed)


class Tally:
    """Outcomes per execution (``ok``, ``refused``) and per feature, and the failures with their cases."""

    def __init__(self) -> None:
        self.cases = 0
        self.checks: Counter = Counter()
        self.features: Counter = Counter()
        self.failures: list[dict[str, Any]] = []

    def count(self, execution: str, outcome: str) -> None:
        self.checks[f"{execution}: {outcome}"] += 1
        with contextlib.suppress(InvalidArgument):  # reason: the regression tests run the checks directly
            event(f"{execution}: {outcome}")

    def report(self) -> dict[str, Any]:
        return {"cases": self.cases, "checks": dict(sorted(self.checks.items())),
                "features": dict(sorted(self.features.items())), "failures": self.failures}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float, what: str,
                 float64: dict[str, torch.Tensor] | None = None) -> None:
    """Same keys (missing gradients count as zero), values within ``rtol`` (graph_oracle's scaling);
    with the ``float64`` step's values (``want`` is the bfloat16 one-line step's), a value outside
    ``rtol`` passes when it is within :data:`ROUNDING_FACTOR` times ``want``'s distance from them."""
    keys = set(got) | set(want)
    zeros = {k: torch.zeros_like((got.get(k) if k in got else want[k])) for k in keys}
    got_all, want_all = {k: got.get(k, zeros[k]) for k in keys}, {k: want.get(k, zeros[k]) for k in keys}
    error, where = max_rel_error(got_all, want_all, {k: k for k in keys})
    if error > rtol and float64 is not None:
        exact = {k: float64.get(k, zeros[k]).double() for k in keys}
        beyond = [k for k in keys
                  if _distance(got_all[k], exact[k]) > ROUNDING_FACTOR * _distance(want_all[k], exact[k])]
        error, where = max_rel_error({k: got_all[k] for k in beyond}, {k: want_all[k] for k in beyond},
                                     {k: k for k in beyond}) if beyond else (0.0, "")
    assert error <= rtol, f"{what}{where} differs: relative error {error:.3g} > {rtol:g}"


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b).abs().max().item()


def assert_same_step(got: StepRecord, want: StepRecord, rtol: float, what: str,
                     buffers: set[str] | None = None, float64: StepRecord | None = None) -> None:
    """``got``'s losses, logits, gradients and ``buffers`` (default: all) equal ``want``'s for its
    heads; ``float64``: under autocast, ``want``'s step in float64 (:func:`assert_close`)."""
    index = {j: i for i, j in enumerate(want.heads)}
    for i, j in enumerate(got.heads):
        assert_close({"loss": got.losses[i]}, {"loss": want.losses[index[j]]}, rtol, f"{what}head {j} ")
        if got.logits:  # reason: StageParallel reports losses only
            assert_close({"logits": got.logits[i]}, {"logits": want.logits[index[j]]}, rtol, f"{what}head {j} ")
    wanted = want.grads if buffers is None else {n: want.grads.get(n, torch.zeros_like(g)) for n, g in got.grads.items()}
    assert_close(got.grads, wanted, rtol, f"{what}gradient of ", float64.grads if float64 is not None else None)
    names = set(want.buffers) if buffers is None else buffers
    assert_close({n: got.buffers[n].double() for n in names}, {n: want.buffers[n].double() for n in names},
                 rtol, f"{what}buffer ")


def check_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepOptions, one_line: StepRecord) -> None:
    """(b): the one-line step's gradients equal the oracle's (accumulated over the micro-batches)."""
    names = {id(p): n for n, p in model.named_parameters()}
    want: dict[str, torch.Tensor] = {}
    for xs, ys in zip(x.tensor_split(step.micro_batches), y.tensor_split(step.micro_batches)):
        for key, g in reference_grads(model, xs, ys).items():
            want[names[key]] = want.get(names[key], 0) + g / step.micro_batches
    assert_close(one_line.grads, want, 1e-6, "one-line vs oracle: gradient of ")


def _buffers_of(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(b) for m in modules for b in m.buffers()}
    return {n for n, b in model.named_buffers() if id(b) in ids}


def check_sequential(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepOptions,
                     start: dict[str, torch.Tensor], tally: Tally, float64: dict[int, StepRecord]) -> None:
    """(c) for the sequential step of every stage ``k``: its loss, logits, and the gradients of
    the parameters it trains (stage ``k``'s and its head's) are those of the one-line step with
    head ``k``'s weighted loss alone backpropagated (a parameter shared with another stage gets
    only this head's share: the other uses run frozen); the stages it ran have the one-line
    step's buffers, the others kept theirs."""
    plan = fxrelay.plan_of(model)
    for k in range(len(plan.stages)):
        restore(model, start)
        try:
            got = run_step(model, x, y, "sequential", step, stage=k)
        except ValueError as error:
            assert "sequential schedule" in str(error), error  # reason: a refusal names the fix
            tally.count("sequential", "refused")
            return
        stage_step = StageStep(model, k)
        restore(model, start)
        one_line = run_step(model, x, y, "one-line", step, head=stage_step.head)
        ran = _buffers_of(model, [*model.stages[:k + 1], *stage_step.trained_modules()[1:]])
        assert got.heads == [stage_step.head], got.heads
        assert_same_step(got, one_line, AUTOCAST if step.autocast else EXACT, f"sequential stage {k}: ", ran,
                         float64.get(stage_step.head))
        kept = set(start) & set(got.buffers) - ran
        assert_close({n: got.buffers[n].double() for n in kept}, {n: start[n].double() for n in kept}, 0.0,
                     f"sequential stage {k}: buffer of a stage it did not run ")
        tally.count("sequential", "ok")


def float64_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepOptions,
                  sequential: StepOptions | None) -> dict[int | None, StepRecord]:
    """Before an autocast step: the float64 one-line step (key ``None``) and, with ``sequential``
    options (greedy), the one-line step of each head alone; the model's state is left as it was."""
    start, exact = snapshot(model), replace(step, autocast=False)
    steps = {None: run_step(model, x, y, "one-line", exact)}
    restore(model, start)
    for head in range(len(fxrelay.plan_of(model).heads)) if sequential is not None else ():
        steps[head] = run_step(model, x, y, "one-line", replace(sequential, autocast=False), head=head)
        restore(model, start)
    return steps


def check_mode(model: nn.Module, x: torch.Tensor, y: torch.Tensor, case: GraphCase, mode: str,
               options: dict[str, Any], step: StepOptions, tally: Tally) -> None:
    """(b), (c) and (d) for one mode; leaves ``model`` in train mode."""
    transformed = fxrelay.transform(model, mode, example_input=x, tracing=tracing_of(model), **options)
    with contextlib.suppress(InvalidArgument):  # reason: printed with a failing example; none outside hypothesis
        note(f"{mode}: {fxrelay.plan_of(transformed)}")
    # reason: with dropout over micro-batches, the sequential step skips later stages' draws
    sequential = step if "dropout" not in case.features else StepOptions(1, step.autocast, step.seed)
    float64 = float64_steps(transformed, x, y, step, sequential if mode == "greedy" else None) \
        if step.autocast else {}
    if step.autocast:
        transformed.float()
        x = x.float()
    start = snapshot(transformed)
    try:
        restore(transformed, start)
        want = run_step(transformed, x, y, "one-line", step)
        for execution in ("recompute", "local"):
            restore(transformed, start)
            assert_same_step(run_step(transformed, x, y, execution, step), want,
                             AUTOCAST if step.autocast else EXACT, f"{mode} {execution} vs one-line: ",
                             float64=float64.get(None))
            tally.count(execution, "ok")
        tally.count("one-line", "ok")
        if mode == "greedy":
            check_sequential(transformed, x, y, sequential, start, tally, float64)
        restore(transformed, start)
        if not step.autocast and "dropout" not in case.features:
            check_oracle(transformed, x, y, step, want)
            tally.count("oracle", "ok")
        if not step.autocast:
            check_eval(model, transformed, x, mode)
    finally:
        model.double().train()


def check_eval(model: nn.Module, transformed: nn.Module, x: torch.Tensor, mode: str) -> None:
    """(d): eval output equals the original model's; deploy equals the eval output."""
    transformed.eval()
    with torch.no_grad():
        out = transformed(x)
        assert_outputs_close(out, model.eval()(x), 1e-12, f"{mode}: eval output vs original")
        assert_outputs_close(fxrelay.deploy(transformed)(x), out, 1e-9, f"{mode}: deploy vs eval output")


def check_graph(case: GraphCase, data: st.DataObject, tally: Tally) -> None:
    """Every check for ``case``, with transform and step options drawn from ``data``."""
    model, x, y = build(case)
    plan = check_partition(model, x)
    with contextlib.suppress(InvalidArgument):  # reason: the regression tests replay a case outside hypothesis
        event(f"stages: {len(plan.stages)}")
    step = step_options(data, case)
    if step.micro_batches > 1:  # reason: each micro-batch keeps the case's batch size (BatchNorm needs 2 samples)
        x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.roll(1)])
    tally.cases += 1
    tally.features.update(case.features | {f for f, on in (("accumulation", step.micro_batches > 1),
                                                            ("autocast", step.autocast)) if on})
    for mode in MODES:
        check_mode(model, x, y, case, mode, transform_options(data, mode, len(plan.stages)), step, tally)


CI_TALLY = Tally()


@pytest.mark.filterwarnings("ignore::UserWarning")  # reason: random graphs hit every warned-about corner
@settings(max_examples=CASES) if CASES else (lambda test: test)
@given(case=CI_GRAPHS, data=st.data())
def test_random_graph(case: GraphCase, data: st.DataObject) -> None:
    check_graph(case, data, CI_TALLY)


@pytest.fixture(autouse=True, scope="module")
def _write_ci_report() -> Iterator[None]:
    """With ``FXRELAY_DIFF_REPORT`` set, the CI run's counts go there too (``ci.`` before the suffix)."""
    yield
    path = os.environ.get("FXRELAY_DIFF_REPORT")
    if path and CI_TALLY.cases:
        root, ext = os.path.splitext(path)
        with open(f"{root}.ci{ext}", "w") as f:
            json.dump(CI_TALLY.report(), f, indent=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_graph_long() -> None:
    """``FXRELAY_DIFF_CASES`` cases (default 5,000); failures are recorded (with the case and the
    drawn options) instead of stopping the run; the JSON report is rewritten every 100 cases."""
    tally, path = Tally(), os.environ.get("FXRELAY_DIFF_REPORT")

    def write() -> None:
        if path:
            with open(path, "w") as f:
                json.dump(tally.report(), f, indent=1)

    @settings(max_examples=CASES or 5000, database=None, derandomize=False, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=CI_GRAPHS, data=st.data())
    def run(case: GraphCase, data: st.DataObject) -> None:
        drawn = _Recorder(data)
        try:
            check_graph(case, drawn, tally)
        except Exception as error:  # reason: the long run records every failure and goes on
            tally.failures.append({"case": repr(case), "seed": case.seed, "drawn": drawn.draws,
                                   "error": f"{type(error).__name__}: {error}",
                                   "where": traceback.format_exc()})
        if tally.cases % 100 == 0:
            write()

    run()
    write()
    assert not tally.failures, f"{len(tally.failures)} failures; see {path}"


class _Recorder:
    """A ``st.data()`` that remembers what was drawn (a failure's reproduction)."""

    def __init__(self, data: st.DataObject):
        self.data, self.draws = data, []

    def draw(self, strategy: st.SearchStrategy, label: str | None = None) -> Any:
        value = self.data.draw(strategy, label=label)
        self.draws.append([label, repr(value)])
        return value


PARALLEL_CASES = 24
PARALLEL_FEATURES = FEATURES - {"dropout"}  # reason: each process draws its own dropout masks


def stage_parallel_cases(n: int = PARALLEL_CASES) -> list[tuple[GraphCase, str, dict[str, Any], int]]:
    """``n`` fixed (derandomized) cases of at least 2 stages: case, mode, transform options, micro-batches."""
    cases: list[tuple[GraphCase, str, dict[str, Any], int]] = []

    @settings(max_examples=10 * n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=graphs(PARALLEL_FEATURES), data=st.data())
    def collect(case: GraphCase, data: st.DataObject) -> None:
        model, x, _ = build(case)
        stages = len(fxrelay.partition(model, example_input=x, tracing=tracing_of(model)).stages)
        mode = data.draw(st.sampled_from(["greedy", "relay"]))
        drawn = (case, mode, transform_options(data, mode, stages), data.draw(st.sampled_from([1, 2])))
        if len(cases) < n and stages > 1 and case.source not in {c[0].source for c in cases}:
            cases.append(drawn)

    collect()
    return cases


def stage_parallel_case(case: GraphCase, mode: str, options: dict[str, Any], micro_batches: int) -> str:
    """One case on this rank of the 2-process group: ``"ok"``, ``"refused: ..."`` or ``"failed: ..."``."""
    model, x, y = build(case)
    if micro_batches > 1:  # reason: as in check_graph, each micro-batch keeps the case's batch size
        x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.roll(1)])
    transformed = fxrelay.transform(model, mode, example_input=x, tracing=tracing_of(model), **options)
    start = snapshot(transformed)
    want = run_step(transformed, x, y, "one-line", StepOptions(micro_batches=micro_batches))
    restore(transformed, start)
    try:
        got = stage_parallel_step(transformed, x, y, micro_batches)
    except (ValueError, NotImplementedError) as error:
        return f"refused: {error}"
    try:
        assert got.grads, "no parameter trains on this rank"
        assert_same_step(got, want, EXACT, f"StageParallel {mode}: ", set(got.buffers))
    except AssertionError as error:
        return f"failed: {error}"
    return "ok"


def _stage_parallel_worker(rank: int, port: int, cases: list, out: str) -> None:
    import datetime
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # reason: two processes share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        outcomes: list[str] = []
        for case in cases:
            try:
                outcomes.append(stage_parallel_case(*case))
            except Exception as error:  # reason: reported per case; the parent asserts
                outcomes.append(f"failed: {type(error).__name__}: {error}")
            if outcomes[-1].startswith("failed"):
                break  # reason: the other rank may be waiting on a message that will never come
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(outcomes, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_parallel_on_a_sample(tmp_path) -> None:
    """24 fixed cases, each a ``StageParallel`` step over 2 processes of ONE gloo group, against the
    one-line step accumulated over the micro-batches: each rank's losses, gradients and buffers;
    or a refusal that says the fix (never a silent skip)."""
    cases = stage_parallel_cases()
    assert len(cases) == PARALLEL_CASES
    mp.spawn(_stage_parallel_worker, args=(_free_port(), cases, str(tmp_path)), nprocs=2)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    outcomes = [rank[:min(map(len, outcomes))] for rank in outcomes]  # reason: a failure stops both ranks
    failures = [(i, o) for rank in outcomes for i, o in enumerate(rank) if o.startswith("failed")]
    assert not failures, "\n".join(f"case {i} ({cases[i][1]}, {cases[i][2]}): {o}\n{cases[i][0]!r}"
                                    for i, o in failures)
    assert len(outcomes[0]) == PARALLEL_CASES
    for i, (a, b) in enumerate(zip(*outcomes)):
        assert a.startswith("refused") == b.startswith("refused"), f"case {i}: ranks disagree: {a} / {b}"
    print(dict(Counter(o.split(":")[0] for o in outcomes[0])))

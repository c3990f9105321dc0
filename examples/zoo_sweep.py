"""Traceability sweep: one model per timm architecture family and per torchvision family.

For each model (``pretrained=False``, eval mode, one random input of at most 224 px,
the model's default size when smaller) the checks in :data:`CHECKS` run in order:

* ``trace``: :func:`fxrelay.trace`, then the traced output must equal the eager one
  (atol = rtol = 1e-4);
* ``partition``: :func:`fxrelay.partition` on the same instance (a second trace, which
  also catches module caches corrupted by the first), then ``plan.run_stages`` must
  equal the eager output;
* ``feature_info``: timm's ``feature_info`` reductions next to the plan's.

A check is a function ``check(ctx) -> dict`` of CSV columns; it may leave values in
``ctx.shared`` for later checks (``ctx.shared["plan"]``). To add columns (deploy,
render, ...) append a function to ``CHECKS``. The first check that raises ends the
model's row with ``failed_at`` and ``reason``.

Families are timm's model modules (``resnet``, ``vision_transformer``) and torchvision's
(``tv:resnet``); ``--families`` also takes the aliases in :data:`ALIASES` (``vit``,
``tv:vit``, ``swin``, ...) and model names (``resnet50``, ``tv:vgg11``: that model's family).
``--list-families`` prints them all.

Example:
    $ python examples/zoo_sweep.py --families resnet,vit,tv:vgg --out out/zoo_small.csv
    $ python examples/zoo_sweep.py                # everything, ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import difflib
import os
import re
import signal
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import fxrelay
from fxrelay.io.zoo import TORCHVISION_PREFIX, example_input, load_model

MAX_SIZE = 224
TOLERANCE = 1e-4
TIMEOUT_S = 240
ALIASES = {  # reason: the short names people use for the families whose module name is long
    "vit": "vision_transformer", "swin": "swin_transformer", "swinv2": "swin_transformer_v2",
    "mixer": "mlp_mixer", "effnet": "efficientnet", "mobilenet": "mobilenetv3", "regnety": "regnet",
    "inception": "inception_v3",
}
TORCHVISION_ALIASES = {"vit": "vision_transformer", "swin": "swin_transformer", "effnet": "efficientnet",
                       "mobilenet": "mobilenetv3", "shufflenet": "shufflenetv2"}
_SIZE_WORDS = ("atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "tiny", "t", "mini", "small", "s")


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the sweep: ``source`` is ``"timm"`` or ``"tv"``."""

    source: str
    family: str
    name: str


@dataclasses.dataclass
class Context:
    """What a check reads: the model, its input and eager output, and earlier checks' values."""

    case: Case
    model: nn.Module
    x: torch.Tensor
    expected: Any
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)


def max_abs_diff(got: Any, expected: Any) -> float:
    """Largest absolute difference between two (nested) outputs; raises if they do not match in structure."""
    got_leaves, expected_leaves = tree_flatten(got)[0], tree_flatten(expected)[0]
    if len(got_leaves) != len(expected_leaves):
        raise AssertionError(f"output structure differs: {len(got_leaves)} vs {len(expected_leaves)} values")
    diffs = [0.0]
    for g, e in zip(got_leaves, expected_leaves):
        if isinstance(e, torch.Tensor):
            if g.shape != e.shape:
                raise AssertionError(f"output shape differs: {tuple(g.shape)} vs {tuple(e.shape)}")
            if not torch.allclose(g, e, atol=TOLERANCE, rtol=TOLERANCE):
                raise AssertionError(f"output differs (max abs diff {(g - e).abs().max().item():.3g})")
            diffs.append((g - e).abs().max().item())
    return max(diffs)


def check_trace(ctx: Context) -> dict[str, Any]:
    start = time.perf_counter()
    gm = fxrelay.trace(ctx.model, ctx.x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        diff = max_abs_diff(gm(ctx.x), ctx.expected)
    return {"trace_s": round(seconds, 3), "nodes": len(gm.graph.nodes),
            "leaves": len(gm.meta["fxrelay_leaves"]), "trace_diff": f"{diff:.2g}"}


def check_partition(ctx: Context) -> dict[str, Any]:
    start = time.perf_counter()
    plan = fxrelay.partition(ctx.model, example_input=ctx.x)
    seconds = time.perf_counter() - start
    ctx.shared["plan"] = plan
    with torch.no_grad():
        diff = max_abs_diff(fxrelay.run_stages(plan, ctx.x), ctx.expected)
    return {"partition_s": round(seconds, 3), "boundaries": plan.boundaries, "stages": len(plan.stages),
            "reductions": " ".join(str(s.reduction) for s in plan.stages),
            "max_cut": max(len(s.inputs) for s in plan.stages), "run_stages_diff": f"{diff:.2g}"}


def check_feature_info(ctx: Context) -> dict[str, Any]:
    info = getattr(ctx.model, "feature_info", None)
    if ctx.case.source != "timm" or not info:
        return {}
    timm_reductions = [f["reduction"] for f in info]
    plan_reductions = [s.reduction for s in ctx.shared["plan"].stages]
    return {"feature_info": " ".join(map(str, timm_reductions)),
            "feature_info_match": sorted(set(timm_reductions)) == plan_reductions}


def _deploy_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference, failing above 1e-4 * max(1, max |expected|) (the deploy criterion)."""
    diff = (got - expected).abs().max().item()
    if diff > TOLERANCE * max(1.0, expected.abs().max().item()):
        raise AssertionError(f"deployed output differs (max abs diff {diff:.3g})")
    return diff


def _deployed_diff(ctx: Context, make: Callable[[nn.Module, torch.Tensor], nn.Module]) -> tuple[float, str]:
    """Deployed vs eager difference, and the precision it holds in.

    A random-init model whose activations reach ~1e3 rounds differently in float32
    whatever the graph (visformer: eager float32 vs float64 differ by 1.2e-4 of the max);
    such a model is checked again in float64, where folding must be exact.
    """
    try:
        with torch.no_grad():
            return _deploy_diff(make(ctx.model, ctx.x)(ctx.x), ctx.expected), "float32"
    except AssertionError:
        model, x = copy.deepcopy(ctx.model).double(), ctx.x.double()
        with torch.no_grad():
            return _deploy_diff(make(model, x)(x), model(x)), "float64"


def check_deploy(ctx: Context) -> dict[str, Any]:
    from fxrelay.deployment.fold import count_batchnorms, fold_report

    diff, precision = _deployed_diff(ctx, fxrelay.deploy)
    deployed = fxrelay.deploy(ctx.model, ctx.x)
    return {"deploy_diff": f"{diff:.2g}", "deploy_precision": precision,
            "bn_before": count_batchnorms(ctx.shared["plan"].graph_module), "bn_after": count_batchnorms(deployed),
            "bn_unfoldable": len(fold_report(deployed))}


def check_deploy_transformed(ctx: Context) -> dict[str, Any]:
    def deploy_transformed(model: nn.Module, x: torch.Tensor) -> nn.Module:
        return fxrelay.deploy(fxrelay.transform(model, "relay", example_input=x, num_classes=10))

    diff, precision = _deployed_diff(ctx, deploy_transformed)
    return {"deploy_transformed_diff": f"{diff:.2g}", "deploy_transformed_precision": precision}


CHECKS: list[Callable[[Context], dict[str, Any]]] = [
    check_trace, check_partition, check_feature_info, check_deploy, check_deploy_transformed,
]


def timm_families() -> dict[str, list[str]]:
    """timm's architecture modules and their model names."""
    import timm
    from timm.models._registry import _model_to_module

    families = collections.defaultdict(list)
    for name in timm.list_models():
        families[_model_to_module[name]].append(name)
    return dict(sorted(families.items()))


def timm_cases(wanted: set[str] | None = None) -> list[Case]:
    """The smallest model (by parameter count) of every timm architecture module (or of those ``wanted``)."""
    return [Case("timm", family, _smallest_timm(names)) for family, names in timm_families().items()
            if wanted is None or family in wanted]


def _smallest_timm(names: list[str]) -> str:
    # reason: counting every model's parameters takes ~10 min; count only the likeliest few
    candidates = sorted(names, key=_size_hint)[:4]
    return min(candidates, key=lambda n: (_meta_param_count(n), _size_hint(n)))


def _size_hint(name: str) -> tuple[int, int, int]:
    tokens = re.split(r"[_.\-]", name)
    word = min((_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS), default=len(_SIZE_WORDS))
    number = re.search(r"\d+", name)
    return word, int(number.group()) if number else 0, len(name)


def _meta_param_count(name: str) -> float:
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in timm.create_model(name).parameters())
    except Exception:  # noqa: BLE001  (reason: a model that cannot be built on meta is ranked last)
        return float("inf")


def torchvision_families() -> dict[str, list[str]]:
    """torchvision's classification model modules and their model names (without ``tv:``)."""
    import torchvision.models as tvm

    families = collections.defaultdict(list)
    for name in tvm.list_models(module=tvm):
        families[tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]].append(name)
    return dict(sorted(families.items()))


def torchvision_cases(wanted: set[str] | None = None) -> list[Case]:
    """The smallest classification model of every torchvision model module (or of those ``wanted``)."""
    return [Case("tv", f, min(names, key=_torchvision_param_count)) for f, names in torchvision_families().items()
            if wanted is None or f"{TORCHVISION_PREFIX}{f}" in wanted]


def _torchvision_param_count(name: str) -> int:
    import torchvision.models as tvm

    return tvm.get_model_weights(name).DEFAULT.meta["num_params"]


def build(case: Case) -> tuple[nn.Module, torch.Tensor, Any]:
    """The eval-mode model, a seeded input of at most ``MAX_SIZE`` px and the eager output.

    A timm model whose default size is larger is rebuilt for ``MAX_SIZE``, and kept at
    its default size when it does not run there (crossvit's two branches, ...).
    """
    if case.source == "tv":
        model = load_model(f"tv:{case.name}")
        x = example_input(model, MAX_SIZE)
        return model, x, model(x)
    import timm

    default = timm.get_pretrained_cfg_value(case.name, "input_size") or (3, MAX_SIZE, MAX_SIZE)
    if max(default[1:]) > MAX_SIZE:
        try:
            model = load_model(case.name, MAX_SIZE)
            x = example_input(model, MAX_SIZE)
            return model, x, model(x)
        except Exception:  # noqa: BLE001  (reason: falls back to the default size below)
            pass
    model = load_model(case.name)
    x = example_input(model)
    return model, x, model(x)


def run_case(case: Case, checks: list[Callable[[Context], dict]]) -> dict[str, Any]:
    """One CSV row: the case, every check's columns, and where and why it failed."""
    row: dict[str, Any] = dataclasses.asdict(case)
    step = "build"  # reason: building includes the eager forward
    try:
        with _deadline(TIMEOUT_S), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model, x, expected = build(case)
            row.update(input="x".join(map(str, x.shape[1:])),
                       params=sum(p.numel() for p in model.parameters()))
            ctx = Context(case, model, x, expected)
            for check in checks:
                step = check.__name__.removeprefix("check_")
                row.update(check(ctx))
        row.update(failed_at="", reason="")
    except Exception as e:  # noqa: BLE001  (reason: a sweep records failures, it does not stop)
        row.update(failed_at=step, reason=_one_line(e))
    return row


class _deadline:
    def __init__(self, seconds: int):
        self.seconds = seconds

    def _expire(self, *_):
        raise TimeoutError(f"took more than {self.seconds} s")

    def __enter__(self):
        signal.signal(signal.SIGALRM, self._expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    """All rows, with the union of their columns in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict[str, Any]]) -> str:
    """Per-source pass rates, timings and failures grouped by reason."""
    lines = []
    for source in sorted({r["source"] for r in rows}):
        group = [r for r in rows if r["source"] == source]
        traced = [r for r in group if r.get("trace_diff") is not None]
        partitioned = [r for r in group if r.get("run_stages_diff") is not None and int(r["stages"]) >= 2]
        times = [r["trace_s"] + r["partition_s"] for r in group if "partition_s" in r]
        lines.append(
            f"{source}: {len(group)} families, traced exactly {_pct(traced, group)}, "
            f"partitioned into >= 2 stages and reproduced {_pct(partitioned, group)}"
        )
        if times:
            lines.append(f"  trace + partition time: median {statistics.median(times):.2f} s, max {max(times):.2f} s")
        deployed = [r for r in group if r.get("deploy_transformed_diff") is not None]
        lines.append(f"  deploy(model) and deploy(transform(model)) match the eager output: {_pct(deployed, group)}")
        wide = [r["name"] for r in deployed if "float64" in (r["deploy_precision"], r["deploy_transformed_precision"])]
        if wide:
            lines.append(f"    float32 rounding of the model itself exceeds the tolerance, exact in float64: {', '.join(wide)}")
        bn = [(int(r["bn_before"]), int(r["bn_after"]), int(r["bn_unfoldable"]))
              for r in group if r.get("bn_after") is not None]
        if bn:
            lines.append(f"  BatchNorms before -> after folding: {sum(b[0] for b in bn)} -> {sum(b[1] for b in bn)}, "
                         f"of which reported unfoldable {sum(b[2] for b in bn)}; models with a foldable BN left: "
                         f"{sum(1 for b in bn if b[1] > b[2])}")
        matches = [r for r in group if "feature_info_match" in r]
        if matches:
            same = [r for r in matches if r["feature_info_match"]]
            lines.append(f"  plan reductions == distinct feature_info reductions: {_pct(same, matches)}")
    failures = collections.defaultdict(list)
    for r in rows:
        if r["failed_at"]:
            failures[(r["failed_at"], r["reason"])].append(f"{r['source']}:{r['name']}")
    if failures:
        lines.append("failures by reason:")
        lines += [f"  [{step}] {reason}: {', '.join(names)}" for (step, reason), names in sorted(failures.items())]
    return "\n".join(lines)


def _pct(part: list, whole: list) -> str:
    return f"{len(part)}/{len(whole)} ({100 * len(part) / max(1, len(whole)):.1f}%)"


def family_names() -> dict[str, str]:
    """Every name ``--families`` accepts, mapped to its family (``tv:`` ones for torchvision).

    Family names map to themselves; then :data:`ALIASES`, and every model name to its family.
    """
    timm_fams, tv_fams = timm_families(), torchvision_families()
    names = {f: f for f in timm_fams} | {f"{TORCHVISION_PREFIX}{f}": f"{TORCHVISION_PREFIX}{f}" for f in tv_fams}
    names |= {alias: family for alias, family in ALIASES.items() if family in timm_fams}
    names |= {f"{TORCHVISION_PREFIX}{alias}": f"{TORCHVISION_PREFIX}{family}"
              for alias, family in TORCHVISION_ALIASES.items() if family in tv_fams}
    for family, models in timm_fams.items():
        names |= {m: family for m in models if m not in names}
    for family, models in tv_fams.items():
        names |= {f"{TORCHVISION_PREFIX}{m}": f"{TORCHVISION_PREFIX}{family}" for m in models
                  if f"{TORCHVISION_PREFIX}{m}" not in names}
    return names


def resolve_families(families: str) -> set[str]:
    """The families a comma-separated ``--families`` value names.

    Raises:
        ValueError: a name that is no family, alias or model (with close matches).
    """
    known = family_names()
    wanted = set()
    for name in filter(None, (n.strip() for n in families.split(","))):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "--list-families lists the names"
            raise ValueError(f"unknown family {name!r}; {hint}")
        wanted.add(known[name])
    if not wanted:
        raise ValueError(f"no family in --families {families!r}")
    return wanted


def select(families: str | None, limit: int | None) -> list[Case]:
    """The cases of the listed families (see :func:`resolve_families`), at most ``limit``."""
    wanted = resolve_families(families) if families is not None else None
    cases = timm_cases(wanted) + torchvision_cases(wanted)
    return cases[:limit] if limit else cases


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/zoo.csv", help="CSV path (default: out/zoo.csv)")
    parser.add_argument("--families", default=None,
                        help="comma-separated families (timm module names, tv:NAME for torchvision), aliases "
                             "(vit, swin, tv:vit, ...) or model names, e.g. resnet,vit,tv:vgg (default: all)")
    parser.add_argument("--list-families", action="store_true", help="print the names --families accepts and exit")
    parser.add_argument("--limit", type=_positive_int, default=None, help="at most N models (default: no limit)")
    args = parser.parse_args(argv)
    if args.list_families:
        by_family = collections.defaultdict(list)
        for name, family in family_names().items():
            if name == family or name in ALIASES or name.removeprefix(TORCHVISION_PREFIX) in TORCHVISION_ALIASES:
                by_family[family].append(name)
        print("\n".join(f"{f}" + (f" (also {', '.join(n for n in names if n != f)})" if len(names) > 1 else "")
                        for f, names in by_family.items()))
        return 0
    try:
        cases = select(args.families, args.limit)
    except ValueError as e:
        print(f"zoo_sweep.py: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    rows = []
    for i, case in enumerate(cases, 1):
        rows.append(run_case(case, CHECKS))
        status = rows[-1]["failed_at"] and f"FAILED at {rows[-1]['failed_at']}: {rows[-1]['reason']}" or "ok"
        print(f"[{i}/{len(cases)}] {case.source}:{case.name} {status}", flush=True)
        write_csv(rows, args.out)  # reason: a partial sweep still leaves its rows
    print(summary(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

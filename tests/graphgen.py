"""Random small CNNs for the property-based suite, each built from a readable program.

:func:`graphs` is a hypothesis strategy of :class:`GraphCase`: the Python source of a
module ``Net`` (tiny widths, float64), its input shape and seed, and the features it
uses. The source *is* the model (:func:`build` executes it), so a failing example
prints a model one can paste into a file and run, and hypothesis shrinks it to few
ops. The generator walks down resolution levels (a few blocks per level, then a
downsampling op), optionally back up a U-Net decoder, and ends in a classifier:

    >>> model, x, y = build(EXAMPLE)
    >>> print(EXAMPLE.source.split("def forward")[1].strip())
    (self, x):
            v1 = F.relu(self.conv1(x))
            v2 = F.max_pool2d(v1, 2)
            logits3 = self.fc(v2.mean((2, 3)))
            return logits3
    >>> model(x).shape
    torch.Size([2, 5])

Features (:data:`FEATURES`): a generated case lists in ``case.features`` those it uses;
``graphs(features=...)`` restricts the generator to a subset.
"""

from __future__ import annotations

import hashlib
import linecache
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["FEATURES", "NUM_CLASSES", "GraphCase", "graphs", "build", "EXAMPLE", "PAIR_LINES"]

NUM_CLASSES = 5
_WIDTHS = (4, 6, 8)  # reason: never NUM_CLASSES, so a pooled feature vector never looks like logits
_MAX_CHANNELS = 16
_INPLACE_RELUS = ("inplace_module", "method_", "functional_inplace", "torch_relu_")

FEATURES = frozenset({
    "batchnorm",          # Conv -> BatchNorm2d (train mode: batch statistics)
    "max_pool",           # nn.MaxPool2d / F.max_pool2d
    "avg_pool",           # nn.AvgPool2d / F.avg_pool2d
    "strided_conv",       # a stride-2 conv opens a level
    "residual",           # branch + skip, out of place (`+`, torch.add, `+=`, which fx records as `+`)
    "residual_inplace",   # branch.add_(skip)
    "dense_cat",          # torch.cat([v, conv(v)], 1)
    "inplace_act",        # nn.ReLU(inplace=True), .relu_(), F.relu(inplace=True), torch.relu_
    "long_skip",          # an earlier level resized to the current one (adaptive pools, interpolate)
    "unet",               # decoder: interpolate up to an encoder tensor's size, merge
    "two_outputs",        # fc(gap(last)) + fc2(gap(earlier level))
    "module_reuse",       # one conv module called twice
    "raw_param",          # F.conv2d(v, self.w), v * self.scale
    "shared_param",       # one raw parameter used in two places
    "inplace_on_cut",     # an older tensor mutated in place (u.mul_(2.0)); later ops read it too
    "size_crossing",      # hw = v.shape[-2:] taken early, used late (F.interpolate(d, size=hw))
    "int_crossing",       # n = v.shape[1] taken early, used late (v * (n / 8))
    "submodules",         # each level's layers live in a container (self.level2.conv5): module-aware cuts
    "dict_output",        # return {"logits": ..., "features": ...}
    "tuple_output",       # return logits, features
    "namedtuple_output",  # return Output(logits, features)
    "intermediate_output",  # a structured output also returns an earlier level's tensor (read from a middle stage)
    "tuple_crossing",     # t = v.chunk(2, 1) taken at one level, its parts read at a later one
    "pair_leaf",          # a leaf module returning a tuple of tensors (a stage may end in it: aux head on a tuple)
    "dropout",            # nn.Dropout in the forward (executions run with the same seed)
    "frozen",             # a layer's parameters frozen (requires_grad_(False))
})


@dataclass(frozen=True)
class GraphCase:
    """One generated model: its source, input shape, weight/data seed and features used."""

    source: str
    input_shape: tuple[int, int, int, int]
    seed: int
    features: frozenset[str] = field(default=frozenset())
    leaves: tuple[str, ...] = ()  # reason: classes of the source that transform must keep as leaf modules

    def __repr__(self) -> str:
        header = (f"# GraphCase: input {self.input_shape}, seed {self.seed}, "
                  f"features {sorted(self.features)}")
        return f"\n{header}\n{self.source}"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))  # reason: hypothesis prints dataclasses field by field otherwise


def build(case: GraphCase) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The case's model (float64, train mode), an input batch and labels, all seeded.

    The model's ``leaf_modules`` attribute lists the classes tracing must keep as leaves
    (``fxrelay.TracingConfig(leaf_modules=model.leaf_modules)``)."""
    digest = hashlib.sha1(case.source.encode()).hexdigest()[:10]
    filename = f"<graphgen {digest}>"
    # reason: tracebacks and fxrelay's TraceError show the generated lines
    linecache.cache[filename] = (len(case.source), None, case.source.splitlines(True), filename)
    # reason: an importable module, so its classes pickle (StageParallel sends a namedtuple output)
    module = sys.modules.setdefault(f"graphgen_{digest}", types.ModuleType(f"graphgen_{digest}"))
    namespace = module.__dict__
    exec(compile(case.source, filename, "exec"), namespace)
    torch.manual_seed(case.seed)
    model = namespace["Net"]().double().train()
    model.leaf_modules = [namespace[name] for name in case.leaves]
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(*case.input_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (case.input_shape[0],), generator=g)
    return model, x, y


@dataclass(frozen=True)
class _Line:
    """A ``forward`` line: the register it defines (if any) and whether it mutates an existing tensor."""

    text: str
    defines: str | None = None
    mutates: bool = False


@dataclass
class _Reg:
    """A value of the program: a tensor (shape C, H, W), a torch.Size (``size``) or an int."""

    name: str
    kind: str
    shape: tuple[int, int, int] | None
    level: int
    alias: int  # reason: an in-place op's result is the same tensor as its input


class _Builder:
    """Emits ``__init__`` and ``forward`` lines while tracking shapes and autograd hazards."""

    def __init__(self, draw: Callable, features: frozenset[str], shape: tuple[int, int, int]):
        self.draw, self.features = draw, features
        self.init: list[str] = []
        self.body: list[_Line] = []
        self.regs = [_Reg("x", "tensor", shape, 0, 0)]
        # reason: a tensor an op saved for backward (conv input, relu output) must not be
        # mutated afterwards, or the *original* model could not train; the input is never mutated
        self.saved = {0: True}
        self.used: set[str] = set()
        self.count = 0
        self.reusable: list[tuple[str, int]] = []  # (conv attribute, channels) of stride-1 cin == cout convs
        self.raw: dict[str, tuple] = {}  # raw parameter attribute -> its shape
        self.reread: list[_Reg] = []  # tensors mutated in place, read once more before the classifier
        self.nested = False  # reason: drawn per case; then layers go in per-level containers
        self.scope = ""
        self.chunks: list[_Reg] = []  # tuples of two halves (tuple_crossing), read at a later level
        self.frozen: list[str] = []  # layers whose parameters are frozen
        self.leaves: list[str] = []  # leaf classes the source defines

    # -- bookkeeping -------------------------------------------------------------
    def on(self, feature: str) -> bool:
        return feature in self.features

    def use(self, feature: str) -> None:
        assert feature in self.features, feature
        self.used.add(feature)

    def fresh(self) -> int:
        self.count += 1
        return self.count

    def module(self, name: str, constructor: str) -> str:
        """Register ``constructor`` as a layer of the current scope; returns its ``self.`` path."""
        container = f"self.{self.scope.rstrip('.')}"
        if self.scope and f"{container} = nn.Module()" not in self.init:
            self.use("submodules")
            self.init.append(f"{container} = nn.Module()")
        path = f"self.{self.scope}{name}"
        self.init.append(f"{path} = {constructor}")
        return path

    def enter(self, scope: str) -> None:
        """Put the layers created from now on in the container ``scope`` (with the submodules feature)."""
        self.scope = f"{scope}." if self.on("submodules") and self.nested else ""

    def value(self, expr: str, kind: str, shape, level: int, alias: int | None = None,
              prefix: str = "v") -> _Reg:
        reg = _Reg(f"{prefix}{len(self.regs)}", kind, shape, level, len(self.regs) if alias is None else alias)
        self.regs.append(reg)
        self.saved.setdefault(reg.alias, False)
        self.body.append(_Line(f"{reg.name} = {expr}", reg.name, alias is not None))
        return reg

    def save(self, reg: _Reg) -> None:
        self.saved[reg.alias] = True

    def tensors(self, where: Callable[[_Reg], bool] = lambda r: True) -> list[_Reg]:
        return [r for r in self.regs if r.kind == "tensor" and where(r)]

    # -- layers --------------------------------------------------------------------
    def conv(self, src: _Reg, cout: int, k: int = 3, stride: int = 1, act: str | None = None) -> _Reg:
        """Conv (+ BN, drawn) (+ activation, drawn unless ``act`` is given)."""
        i = self.fresh()
        c, h, w = src.shape
        bn = self.on("batchnorm") and self.draw(st.booleans())
        conv = self.module(f"conv{i}", f"nn.Conv2d({c}, {cout}, {k}, stride={stride}, padding={k // 2}, "
                                        f"bias={not bn})")
        expr = f"{conv}({src.name})"
        self.save(src)
        if bn:
            self.use("batchnorm")
            expr = f"{self.module(f'bn{i}', f'nn.BatchNorm2d({cout})')}({expr})"
        if stride == 1 and c == cout:
            self.reusable.append((conv, c))
        if stride > 1:
            self.use("strided_conv")
        shape = (cout, (h - 1) // stride + 1, (w - 1) // stride + 1)
        activated, _ = self.activation(expr, i, act)
        out = self.value(activated, "tensor", shape, src.level)
        if activated != expr:
            self.save(out)  # reason: relu saves its output
        return out

    def activation(self, expr: str, i: int, act: str | None) -> tuple[str, bool]:
        """``expr`` through a ReLU of a drawn style (``act``: ``"none"`` or given); returns the
        expression and whether the ReLU works in place."""
        if act is None:
            act = self.draw(st.sampled_from(["relu", "none", "module"] + (list(_INPLACE_RELUS) if
                                                                          self.on("inplace_act") else [])))
        if act == "none":
            return expr, False
        inplace = act in _INPLACE_RELUS
        if inplace:
            self.use("inplace_act")
        if act in ("module", "inplace_module"):
            layer = self.module(f"act{i}", "nn.ReLU(inplace=True)" if inplace else "nn.ReLU()")
            return f"{layer}({expr})", inplace
        calls = {"relu": f"F.relu({expr})", "method_": f"{expr}.relu_()",
                 "functional_inplace": f"F.relu({expr}, inplace=True)", "torch_relu_": f"torch.relu_({expr})"}
        return calls[act], inplace

    def downsample(self, src: _Reg) -> _Reg:
        c, h, w = src.shape
        kinds = [k for k in ("max_pool", "avg_pool", "strided_conv") if self.on(k)]
        if min(h, w) < 2:
            kinds = [k for k in kinds if k == "strided_conv"]
        if not kinds:
            return src
        kind = self.draw(st.sampled_from(kinds))
        if kind == "strided_conv":
            out = self.conv(src, self.draw(st.sampled_from(_WIDTHS)), stride=2)
        else:
            self.use(kind)
            op = "max" if kind == "max_pool" else "avg"
            if self.draw(st.booleans()):
                expr = f"{self.module(f'pool{self.fresh()}', f'nn.{op.title()}Pool2d(2)')}({src.name})"
            else:
                expr = f"F.{op}_pool2d({src.name}, 2)"
            self.save(src)
            out = self.value(expr, "tensor", (c, h // 2, w // 2), src.level)
        out.level = src.level + 1
        return out

    def resize(self, src: _Reg, like: _Reg, size: _Reg | None = None) -> _Reg:
        """``src`` at ``like``'s spatial size (adaptive pooling down, interpolation up)."""
        c, h, w = src.shape
        _, h2, w2 = like.shape
        target = size.name if size is not None else f"{like.name}.shape[-2:]"
        if h2 <= h and w2 <= w:
            how = self.draw(st.sampled_from(["adaptive_avg", "interpolate", "adaptive_max"]))
        else:
            how = self.draw(st.sampled_from(["interpolate", "bilinear"]))
        expr = {"adaptive_avg": f"F.adaptive_avg_pool2d({src.name}, {target})",
                "adaptive_max": f"F.adaptive_max_pool2d({src.name}, {target})",
                "interpolate": f"F.interpolate({src.name}, size={target})",
                "bilinear": f"F.interpolate({src.name}, size={target}, mode='bilinear', align_corners=False)"}[how]
        if how.startswith("adaptive"):
            self.save(src)  # reason: adaptive pools save their input; interpolation does not
        return self.value(expr, "tensor", (c, h2, w2), like.level)

    def merge(self, v: _Reg, other: _Reg) -> _Reg:
        """``v`` combined with a same-size ``other``: concatenation (+ 1x1 conv) or a sum."""
        c = v.shape[0]
        if self.draw(st.booleans()):
            out = self.value(f"torch.cat([{v.name}, {other.name}], 1)", "tensor",
                             (c + other.shape[0], *v.shape[1:]), v.level)
            return self.conv(out, self.draw(st.sampled_from(_WIDTHS)), k=1)
        if other.shape[0] != c:
            other = self.conv(other, c, k=1, act="none")
        return self.value(f"{v.name} + {other.name}", "tensor", v.shape, v.level)

    # -- blocks --------------------------------------------------------------------
    def blocks(self) -> list[str]:
        """The block kinds available now, the plainest first (shrinking goes there)."""
        kinds = ["conv"]
        if self.on("residual") or self.on("residual_inplace"):
            kinds.append("residual")
        if self.on("dense_cat"):
            kinds.append("dense")
        if self.on("module_reuse"):
            kinds.append("reuse")
        if self.on("raw_param"):
            kinds += ["raw_conv", "scale"]
        if self.on("long_skip"):
            kinds.append("long_skip")
        if self.on("int_crossing"):
            kinds.append("int_scale")
        if self.on("inplace_on_cut"):
            kinds.append("mutate")
        if self.on("tuple_crossing"):
            kinds.append("chunk")
        if self.on("pair_leaf"):
            kinds.append("pair")
        if self.on("dropout"):
            kinds.append("dropout")
        return kinds

    def block(self, v: _Reg, kind: str) -> _Reg:
        return getattr(self, f"block_{kind}")(v)

    def block_conv(self, v: _Reg) -> _Reg:
        return self.conv(v, self.draw(st.sampled_from(_WIDTHS)))

    def block_residual(self, v: _Reg) -> _Reg:
        c = v.shape[0]
        cout = self.draw(st.sampled_from(_WIDTHS))
        branch = self.conv(self.conv(v, cout), cout, act="none")
        skip = v if cout == c else self.conv(v, cout, k=1, act="none")
        styles = (["+", "torch.add", "+="] if self.on("residual") else []) + \
                 (["add_"] if self.on("residual_inplace") else [])
        style = self.draw(st.sampled_from(styles))
        self.use("residual_inplace" if style == "add_" else "residual")
        if style == "+=":
            self.body.append(_Line(f"{branch.name} += {skip.name}", mutates=True))
            out = branch
        elif style == "add_":
            out = self.value(f"{branch.name}.add_({skip.name})", "tensor", branch.shape, v.level, branch.alias)
        else:
            expr = f"{branch.name} + {skip.name}" if style == "+" else f"torch.add({branch.name}, {skip.name})"
            out = self.value(expr, "tensor", branch.shape, v.level)
        expr, inplace = self.activation(out.name, self.fresh(), None)
        if expr == out.name:
            return out
        out = self.value(expr, "tensor", out.shape, v.level, out.alias if inplace else None)
        self.save(out)
        return out

    def block_dense(self, v: _Reg) -> _Reg:
        self.use("dense_cat")
        new = self.conv(v, self.draw(st.sampled_from(_WIDTHS)))
        out = self.value(f"torch.cat([{v.name}, {new.name}], 1)", "tensor",
                         (v.shape[0] + new.shape[0], *v.shape[1:]), v.level)
        return self.conv(out, self.draw(st.sampled_from(_WIDTHS)), k=1) if out.shape[0] > _MAX_CHANNELS else out

    def block_reuse(self, v: _Reg) -> _Reg:
        fits = [name for name, c in self.reusable if c == v.shape[0]]
        if not fits:
            return self.block_conv(v)
        self.use("module_reuse")
        self.save(v)
        out = self.value(f"F.relu({self.draw(st.sampled_from(fits))}({v.name}))", "tensor", v.shape, v.level)
        self.save(out)  # reason: relu saves its output, so no later block may mutate it in place
        return out

    def raw_param(self, prefix: str, shape: tuple, init: str) -> str:
        fits = [name for name, s in self.raw.items() if name.startswith(prefix) and s == shape]
        if fits and self.on("shared_param") and self.draw(st.booleans()):
            self.use("shared_param")
            return self.draw(st.sampled_from(fits))
        name = f"{prefix}{self.fresh()}"
        self.raw[name] = shape
        self.init.append(f"self.{name} = nn.Parameter({init})")
        return name

    def block_raw_conv(self, v: _Reg) -> _Reg:
        self.use("raw_param")
        c = v.shape[0]
        w = self.raw_param("w", (c, c, 3, 3), f"torch.randn({c}, {c}, 3, 3) * {(2 / (9 * c)) ** 0.5:.3f}")
        self.save(v)
        out = self.value(f"F.relu(F.conv2d({v.name}, self.{w}, padding=1))", "tensor", v.shape, v.level)
        self.save(out)
        return out

    def block_scale(self, v: _Reg) -> _Reg:
        self.use("raw_param")
        c = v.shape[0]
        s = self.raw_param("scale", (1, c, 1, 1), f"1 + 0.1 * torch.randn(1, {c}, 1, 1)")
        self.save(v)
        return self.value(f"{v.name} * self.{s}", "tensor", v.shape, v.level)

    def block_long_skip(self, v: _Reg) -> _Reg:
        earlier = self.tensors(lambda r: r.level < v.level)
        if not earlier:
            return self.block_conv(v)
        self.use("long_skip")
        return self.merge(v, self.resize(self.draw(st.sampled_from(earlier)), v))

    def block_int_scale(self, v: _Reg) -> _Reg:
        ints = [r for r in self.regs if r.kind == "int"]
        if not ints:
            return self.block_conv(v)
        self.use("int_crossing")
        n = self.draw(st.sampled_from(ints))
        return self.value(f"{v.name} * ({n.name} / 8)", "tensor", v.shape, v.level)

    def block_mutate(self, v: _Reg) -> _Reg:
        """Mutate an older tensor in place, then read it: later ops may read it again."""
        older = self.tensors(lambda r: r.level < v.level and not self.saved[r.alias])
        if not older:
            return self.block_conv(v)
        self.use("inplace_on_cut")
        u = self.draw(st.sampled_from(older))
        how = self.draw(st.sampled_from(["mul_", "add_", "relu_", "inplace_module"]))
        if how == "inplace_module":
            expr = f"{self.module(f'act{self.fresh()}', 'nn.ReLU(inplace=True)')}({u.name})"
        else:
            expr = {"mul_": f"{u.name}.mul_(2.0)", "add_": f"{u.name}.add_(1.0)",
                    "relu_": f"torch.relu_({u.name})"}[how]
        mutated = self.value(expr, "tensor", u.shape, u.level, u.alias)
        if how in ("relu_", "inplace_module"):
            self.save(mutated)
        self.reread.append(u)  # reason: under its old name, as code written `u.mul_(2.0)` reads it
        return self.merge(v, self.resize(mutated, v))

    def block_chunk(self, v: _Reg) -> _Reg:
        """Split ``v`` into a tuple of two halves now, read them (swapped) at a later level."""
        self.use("tuple_crossing")
        self.save(v)
        self.chunks.append(self.value(f"{v.name}.chunk(2, 1)", "pair", v.shape, v.level, prefix="t"))
        return self.block_conv(v)

    def read_chunks(self, v: _Reg) -> _Reg:
        """Merge every tuple taken at an earlier level into ``v``."""
        for t in [t for t in self.chunks if t.level < v.level]:
            self.chunks.remove(t)
            halves = self.value(f"torch.cat([{t.name}[1], {t.name}[0]], 1)", "tensor", t.shape, t.level)
            v = self.merge(v, self.resize(halves, v))
        return v

    def block_pair(self, v: _Reg) -> _Reg:
        """A leaf module returning a pair of tensors; the pair is read right after (or not at all)."""
        self.use("pair_leaf")
        c = v.shape[0]
        if "Pair" not in self.leaves:
            self.leaves.append("Pair")
        self.save(v)
        pair = self.value(f"{self.module(f'pair{self.fresh()}', f'Pair({c})')}({v.name})", "pair", v.shape,
                          v.level, prefix="p")
        return self.value(f"{pair.name}[0] + {pair.name}[1]", "tensor", v.shape, v.level)

    def block_dropout(self, v: _Reg) -> _Reg:
        self.use("dropout")
        self.save(v)  # reason: dropout saves its mask; the input itself may not be mutated after a conv read it
        return self.value(f"{self.module(f'drop{self.fresh()}', 'nn.Dropout(0.25)')}({v.name})", "tensor", v.shape,
                          v.level)

    def capture(self, v: _Reg, lateral: bool = True) -> None:
        """Take ``v``'s size / channel count now, for use several stages later, and (``lateral``)
        a 1x1 conv of it (FPN-style) that nothing reads before a later level mutates it."""
        if lateral and self.on("inplace_on_cut") and self.draw(st.booleans()):
            self.conv(v, self.draw(st.sampled_from(_WIDTHS)), k=1, act="none")
        if self.on("size_crossing") and self.draw(st.booleans()):
            self.value(f"{v.name}.shape[-2:]", "size", v.shape, v.level, prefix="hw")
        if self.on("int_crossing") and self.draw(st.booleans()):
            self.value(f"{v.name}.shape[1]", "int", None, v.level, prefix="n")

    def size_of(self, level_value: _Reg) -> _Reg | None:
        """A size taken earlier for ``level_value``'s level (size_crossing), if drawn."""
        sizes = [r for r in self.regs if r.kind == "size" and r.shape[1:] == level_value.shape[1:]]
        if sizes and self.draw(st.booleans()):
            self.use("size_crossing")
            return self.draw(st.sampled_from(sizes))
        return None


@st.composite
def _graphs(draw: Callable, features: frozenset[str]) -> GraphCase:
    h, w = draw(st.integers(16, 32)), draw(st.integers(16, 32))
    b = _Builder(draw, features, (3, h, w))
    b.nested = b.on("submodules") and draw(st.booleans())
    b.enter("level0")
    v = b.conv(b.regs[0], draw(st.sampled_from(_WIDTHS)))
    levels = [v]  # reason: per level, its last value (U-Net skips, second outputs)
    b.capture(v)
    for _ in range(draw(st.integers(1, 4) | st.just(4))):  # reason: deep graphs (long skips, overlaps) half the time
        b.enter(f"level{levels[-1].level + 1}")
        v = b.downsample(v)
        b.capture(v, lateral=False)  # reason: sizes taken mid-stage and (below) as a stage's last value
        kinds = b.blocks()
        for _ in range(draw(st.integers(1, 2))):
            v = b.block(v, draw(st.sampled_from(kinds)))
        v = b.read_chunks(v)
        if v.level > levels[-1].level:
            levels.append(v)
            b.capture(v)
        else:
            levels[-1] = v
    if b.on("unet") and len(levels) > 1 and draw(st.booleans()):
        b.use("unet")
        b.enter("decoder")
        for skip in reversed(levels[max(0, len(levels) - 1 - draw(st.integers(1, 3))):-1]):
            v = b.merge(b.resize(v, skip, b.size_of(skip)), skip)
            v = b.conv(v, draw(st.sampled_from(_WIDTHS)))
    for u in b.reread:
        v = b.merge(v, b.resize(u, v))
    sizes = [r for r in b.regs if r.kind == "size"]
    if sizes and draw(st.booleans()):  # reason: a segmentation-style upsampling to an early size
        b.use("size_crossing")
        size = draw(st.sampled_from(sizes))
        v = b.resize(v, next(r for r in b.regs if r.kind == "tensor" and r.shape[1:] == size.shape[1:]), size)
    b.init.append(f"self.fc = nn.Linear({v.shape[0]}, {NUM_CLASSES})")
    logits = f"self.fc({v.name}.mean((2, 3)))"
    if b.on("two_outputs") and len(levels) > 1 and draw(st.booleans()):
        b.use("two_outputs")
        other = draw(st.sampled_from(levels[:-1]))
        b.init.append(f"self.fc2 = nn.Linear({other.shape[0]}, {NUM_CLASSES})")
        logits += f" + self.fc2({other.name}.mean((2, 3)))"
    out = b.value(logits, "tensor", (NUM_CLASSES, 1, 1), v.level, prefix="logits")
    formats = [f for f in ("dict_output", "tuple_output", "namedtuple_output") if b.on(f)]
    fmt = draw(st.sampled_from(formats)) if formats and draw(st.integers(0, 3)) == 3 else "tensor"
    if fmt != "tensor" and b.on("intermediate_output") and len(levels) > 1 and draw(st.booleans()):
        b.use("intermediate_output")
        v = draw(st.sampled_from(levels[:-1]))  # reason: a middle stage's tensor is a model output
    result = {"tensor": out.name, "dict_output": f'{{"logits": {out.name}, "features": {v.name}}}',
              "tuple_output": f"{out.name}, {v.name}",
              "namedtuple_output": f"Output({out.name}, {v.name})"}[fmt]
    if fmt != "tensor":
        b.use(fmt)
    layers = [line.split(" = ", 1)[0] for line in b.init if "nn.Conv2d" in line or "Pair(" in line]
    if b.on("frozen") and layers and draw(st.booleans()):
        b.use("frozen")
        b.frozen = draw(st.lists(st.sampled_from(layers), min_size=1, max_size=2, unique=True))
    return GraphCase(_source(b.init, b.body, result, fmt == "namedtuple_output", b.frozen, b.leaves),
                     (2, 3, h, w), draw(st.integers(0, 2**16)), frozenset(b.used), tuple(b.leaves))


def _live(init: list[str], body: list[_Line], result: str) -> tuple[list[str], list[str]]:
    """The ``__init__`` and ``forward`` lines the result depends on (dead code removed)."""
    names = re.compile(r"\bself(?:\.\w+)+|\b[A-Za-z_]\w*")
    needed = set(names.findall(result))
    kept = []
    for line in reversed(body):
        if line.mutates or line.defines is None or line.defines in needed:
            kept.append(line.text)
            needed |= set(names.findall(line.text.split(" = ", 1)[-1] if line.defines else line.text))
    attributes = {i.split(" = ", 1)[0] for i in init}
    needed |= {a for a in attributes if any(n.startswith(f"{a}.") for n in needed)}  # reason: containers
    used_init = [i for i in init if i.split(" = ", 1)[0] in needed]
    return used_init, kept[::-1]


PAIR_LINES = ["", "", "class Pair(nn.Module):", "    def __init__(self, c):", "        super().__init__()",
         "        self.a = nn.Conv2d(c, c, 3, padding=1)", "        self.b = nn.Conv2d(c, c, 1)", "",
         "    def forward(self, v):", "        return F.relu(self.a(v)), self.b(v)"]


def _source(init: list[str], body: list[_Line], result: str, namedtuple: bool, frozen: list[str] = (),
            leaves: list[str] = ()) -> str:
    init, lines_of_forward = _live(init, body, result)
    lines = ["import torch", "import torch.nn.functional as F", "from torch import nn"]
    if namedtuple:
        lines += ["from typing import NamedTuple", "", "",
                  "class Output(NamedTuple):", "    logits: torch.Tensor", "    features: torch.Tensor"]
    if "Pair" in leaves:
        lines += PAIR_LINES
    lines += ["", "", "class Net(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    kept = {line.split(" = ", 1)[0] for line in init}
    lines += [f"        {line}" for line in init]
    lines += [f"        {layer}.requires_grad_(False)" for layer in frozen if layer in kept]
    lines += ["", "    def forward(self, x):"] + [f"        {line}" for line in lines_of_forward]
    lines.append(f"        return {result}")
    return "\n".join(lines) + "\n"


def graphs(features: frozenset[str] = FEATURES) -> st.SearchStrategy[GraphCase]:
    """Random :class:`GraphCase` values using only ``features`` (a subset of :data:`FEATURES`)."""
    unknown = set(features) - FEATURES
    if unknown:
        raise ValueError(f"unknown graph features {sorted(unknown)}; known: {sorted(FEATURES)}")
    return _graphs(frozenset(features))


EXAMPLE = GraphCase(
    source=_source(["self.conv1 = nn.Conv2d(3, 4, 3, padding=1)", "self.fc = nn.Linear(4, 5)"],
                   [_Line("v1 = F.relu(self.conv1(x))", "v1"), _Line("v2 = F.max_pool2d(v1, 2)", "v2"),
                    _Line("logits3 = self.fc(v2.mean((2, 3)))", "logits3")],
                   "logits3", False),
    input_shape=(2, 3, 16, 16), seed=0)
"""A fixed two-level case (documentation and smoke tests)."""

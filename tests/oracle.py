"""The gradient oracle: reference gradients computed loss by loss, independent of the scopes.

For each head it runs the stages below ``lo_j`` under ``torch.no_grad()``, then
``lo_j..a_j`` and the head with grad, takes ``torch.autograd.grad`` of ``w_j * L_j`` and
sums over heads.
"""

import torch
import torch.nn.functional as F

import fxrelay

RTOL = 1e-5


def _run(plan, stages, env, indices, grad: bool):
    with torch.set_grad_enabled(grad):
        for s in indices:
            stage = plan.stages[s]
            out = stages[s](*(env[n] for n in stage.inputs))
            env.update(zip(stage.outputs, out if len(stage.outputs) > 1 else (out,)))


def oracle_grads(model, x, y):
    """Reference parameter gradients of sum_j w_j L_j, computed loss by loss."""
    plan = fxrelay.plan_of(model)
    stages = [model.stages[i] for i in range(len(plan.stages))]
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for j, head in enumerate(plan.heads):
        lo, a = head.span
        env = {plan.input_names[0]: x}
        _run(plan, stages, env, range(lo), grad=False)
        _run(plan, stages, env, range(lo, a + 1), grad=True)
        features = env[plan.stages[a].outputs[-1]]
        logits = features if head.is_main else model.heads[j].body(features)
        grads = torch.autograd.grad(head.weight * F.cross_entropy(logits, y), params, allow_unused=True)
        total = [t + g if g is not None else t for t, g in zip(total, grads)]
    return total


def one_line_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]


def assert_close(got, want):
    # reason: gradients that are zero in exact arithmetic (a conv bias before BN) are
    # compared against a floor of 1e-6 of the largest gradient instead of their own noise
    floor = 1e-6 * max(w.abs().max().item() for w in want)
    for g, w in zip(got, want):
        scale = max(w.abs().max().item(), floor)
        assert ((g - w).abs().max() / scale).item() <= RTOL

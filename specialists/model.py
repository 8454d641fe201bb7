"""A specialist's network at its start: the generalist folded onto its group plus a dustbin.

Hinton et al. (2015, section 5.2) initialise a specialist with the generalist's weights.
The generalist restricted to a group S gives, for logits z (C classes),

    log p(k) = z_k - lse(z)        for k in S,
    log p(outside S) = lse_{j not in S}(z_j) - lse(z),

so a specialist that outputs ``[z_S, lse(z_rest) + c]`` with c = 0 *is* the generalist
folded onto S + dustbin: its |S| + 1-way softmax equals the folded distribution exactly.
A linear dustbin row cannot do that (log-sum-exp is convex in the features, not linear;
the fitted row this replaced started 1.5-1.7 nats off on a 100-class set, issue 17).

:class:`FoldedSpecialist` is that network: ``base`` is a full copy of the generalist's
architecture and weights (every layer trainable, its C-way head included), and
``dustbin_bias`` is the learned correction c, a scalar that starts at 0 and also carries
the oversampling correction after training (``specialists.train``). The rest rows of the
head keep training through the log-sum-exp, so the dustbin logit stays input-dependent.

It is saved like any kdens model -- ``model.safetensors`` plus ``model.json`` -- under the
factory name ``specialists.model:folded`` with the base architecture, its class count and
the group in ``kwargs``; ``kdens.models.load_model`` rebuilds it by that name (the path
user factories take), so no pickle is involved.

The other start, ``init = "fitted-row"`` (:func:`fitted_row_specialist`, the one before
issue 17): the generalist's own architecture with |S| + 1 outputs, trunk and group rows
copied, the dustbin a *linear* row fitted by least squares to that log-sum-exp. It starts
off (up to 7-12 nats on the worst of 4,096 examples of the many-class set), yet it ends
with a lower validation NLL than the exact start in 55 of 60 specialists and a lower
combined test NLL in 6 of 6 runs -- while students distilled from the exact-start
combinations were as good or better in 4 of 6 (BENCHMARKS.md section 8,
``bench/bench_specialist_init.py``). A likely reason for the first: a single linear dustbin
lets the features forget the other classes, while ``lse(z_rest)`` keeps asking them to
encode all C - |S| other logits -- which may be what makes the exact start the better teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from kdens.errors import ModelError
from kdens.models import build_model, model_spec
from kdens.train import predict_logits

FACTORY = "specialists.model:folded"
INITS = ("exact", "fitted-row")


class FoldedSpecialist(nn.Module):
    """``x -> [z_S(x), lse_{j not in S} z_j(x) + dustbin_bias]``, (B, |S| + 1), with z = ``base(x)``.

    Args:
        base: a C-class model (the generalist's architecture).
        group: the specialist's classes S, in output order; 1 <= |S| < C.
        num_base_classes: C.
    """

    def __init__(self, base: nn.Module, group: list[int], num_base_classes: int):
        super().__init__()
        group = [int(k) for k in group]
        if not group or len(set(group)) != len(group) or min(group) < 0 or max(group) >= num_base_classes \
                or len(group) >= num_base_classes:
            raise ModelError(f"specialist group {group} must be distinct class ids in [0, {num_base_classes - 1}] "
                             f"and fewer than all {num_base_classes} classes (the dustbin needs the rest)")
        inside = set(group)
        self.base = base
        self.group = group
        self.num_base_classes = int(num_base_classes)
        # not persistent: they follow from model.json's group, and stay out of the safetensors file
        self.register_buffer("group_index", torch.tensor(group, dtype=torch.long), persistent=False)
        rest = [k for k in range(num_base_classes) if k not in inside]
        self.register_buffer("rest_index", torch.tensor(rest, dtype=torch.long), persistent=False)
        self.dustbin_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)  # (B, C)
        dustbin = torch.logsumexp(z.index_select(1, self.rest_index), 1, keepdim=True)  # (B, 1)
        return torch.cat([z.index_select(1, self.group_index), dustbin + self.dustbin_bias], 1)  # (B, |S| + 1)


def folded(num_classes: int, input_shape: tuple[int, ...], base: str, base_classes: int, group: list[int],
           base_args: dict | None = None) -> FoldedSpecialist:
    """The model factory behind ``model.json`` name ``specialists.model:folded``.

    Args:
        num_classes: |S| + 1 (checked against ``group``).
        input_shape: the generalist's input shape.
        base: the generalist's model name (a registry name or ``package.module:factory``).
        base_classes: the generalist's number of classes C.
        group: the specialist's classes S.
        base_args: the generalist's model arguments.
    """
    if int(num_classes) != len(group) + 1:
        raise ModelError(f"a specialist for group {list(group)} has {len(group) + 1} outputs (the group plus a "
                         f"dustbin), not {num_classes}; model.json does not fit its group")
    return FoldedSpecialist(build_model(base, int(base_classes), tuple(input_shape), **(base_args or {})),
                            group, int(base_classes))


def folded_spec(gen_spec: dict, group: list[int]) -> dict:
    """``model.json`` of a specialist for ``group`` on the generalist described by ``gen_spec``."""
    kwargs = {"base": gen_spec["name"], "base_classes": int(gen_spec["num_classes"]), "group": [int(k) for k in group],
              "base_args": dict(gen_spec["kwargs"])}
    return model_spec(FACTORY, len(group) + 1, gen_spec["input_shape"], kwargs)


def specialist_from_generalist(generalist: nn.Module, gen_spec: dict, group: list[int]) -> tuple[FoldedSpecialist, dict]:
    """A specialist equal to the generalist folded onto ``group`` + dustbin: (model in train mode, its spec)."""
    spec = folded_spec(gen_spec, group)
    kw = spec["kwargs"]
    model = folded(spec["num_classes"], tuple(spec["input_shape"]), kw["base"], kw["base_classes"], kw["group"],
                   kw["base_args"])
    state = {k: v.detach().cpu() for k, v in generalist.state_dict().items()}
    try:
        model.base.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"the generalist's weights do not fit its own model.json ({gen_spec['name']}): {e}") from None
    return model.train(), spec


# ---------------------------------------------------------------- init = "fitted-row"

@torch.inference_mode()
def head_features(model: nn.Module, x, batch_size: int = 2048) -> torch.Tensor:
    """What ``model.head`` receives for inputs ``x`` (eval mode), (N, H) float32 on the CPU."""
    feats: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: feats.append(args[0].float().cpu()))
    try:
        predict_logits(model, x, batch_size)
    finally:
        hook.remove()
    return torch.cat(feats) if feats else torch.empty(0, model.head.in_features)


def fit_dustbin_row(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    group: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dustbin row (w, b) whose logit best matches ``lse_{j not in S} z_j(h)`` in least squares.

    Ridge least squares on the features h of training examples:
    ``min ||[h, 1] (w, b) - lse||^2 + lam ||w||^2``, lam = 1e-3 mean(diag h'h / n), bias not
    shrunk. (Mean of the other rows with the logsumexp of their biases, the common
    alternative, is exact only where the other logits are equal; its error is reported too.)

    Returns:
        (w (H,), b (), {"dustbin_init_rmse", "dustbin_init_rmse_mean_rows"}) in weight's dtype.
    """
    outside = [k for k in range(weight.shape[0]) if k not in set(group)]
    h = features.double()  # (N, H)
    w_out, b_out = weight[outside].double(), bias[outside].double()  # (R, H), (R,)
    target = torch.logsumexp(h @ w_out.T + b_out, 1)  # (N,)
    x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)  # (N, H + 1)
    gram = x.T @ x / len(x)  # (H + 1, H + 1)
    lam = 1e-3 * float(gram.diagonal()[:-1].mean().clamp_min(1e-12))
    ridge = torch.full((x.shape[1],), lam, dtype=h.dtype)
    ridge[-1] = 0.0
    sol = torch.linalg.solve(gram + torch.diag(ridge), x.T @ target / len(x))  # (H + 1,)
    rmse = float(((x @ sol - target) ** 2).mean().sqrt())
    mean_rows = h @ w_out.mean(0) + torch.logsumexp(b_out, 0)  # (N,)
    rmse_mean = float(((mean_rows - target) ** 2).mean().sqrt())
    info = {"dustbin_init_rmse": rmse, "dustbin_init_rmse_mean_rows": rmse_mean}
    return sol[:-1].to(weight.dtype), sol[-1].to(bias.dtype), info


def fitted_row_specialist(generalist: nn.Module, gen_spec: dict, group: list[int],
                          features: torch.Tensor) -> tuple[nn.Module, dict, dict]:
    """The generalist's architecture with |S| + 1 outputs: its weights, group rows, a fitted dustbin row.

    Args:
        features: head inputs of training examples, for :func:`fit_dustbin_row`.

    Returns:
        (model in train mode, its model.json spec, the dustbin fit's info).
    """
    if not isinstance(getattr(generalist, "head", None), nn.Linear):
        raise ModelError(f"generalist model {gen_spec['name']!r} has no `head: nn.Linear` to copy output rows from; "
                         "use --init exact, which needs none")
    spec = model_spec(gen_spec["name"], len(group) + 1, gen_spec["input_shape"], gen_spec["kwargs"])
    model = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["kwargs"])
    src = {k: v.detach().cpu() for k, v in generalist.state_dict().items()}
    w, b = src["head.weight"], src["head.bias"]  # (C, H), (C,)
    w_d, b_d, info = fit_dustbin_row(features, w, b, group)
    state = {k: v for k, v in src.items() if not k.startswith("head.")}
    state["head.weight"] = torch.cat([w[list(group)], w_d[None]])  # (|S| + 1, H)
    state["head.bias"] = torch.cat([b[list(group)], b_d[None]])  # (|S| + 1,)
    model.load_state_dict(state)
    return model.train(), spec, info


@torch.no_grad()
def raise_dustbin(model: nn.Module, delta: float) -> None:
    """Add ``delta`` to a specialist's dustbin logit, in its weights (either kind of start)."""
    if isinstance(model, FoldedSpecialist):
        model.dustbin_bias += delta
    else:
        model.head.bias[-1] += delta

"""The variance over U of the forecast: a delete-one-unit jackknife through the exact direction map.

docs/design.md section 7. Given U, ``delta_h1 = eta Xbar_E . v(U)``; another U gives another v. For each U
unit m the direction is rebuilt from ``g_(-m) = (B_U grad J_U - grad J_m) / (B_U - 1)`` by the very
rule that built v (``direction.build_direction``: Adam's v_hat, momentum, bias correction, weight
decay and the clip factor all recomputed), and ``dv_m = v_(-m) - v`` is projected on the mean X of
two independent halves A and B of E:

    a_m = Xbar_A . dv_m,   b_m = Xbar_B . dv_m,   E[a_m b_m | U] = (grad H . dv_m)^2

so the product carries no E noise (projecting both on Xbar_E would add ``tr(Sigma_X Sigma_dv)/B_E``,
which ``var_cond_e`` already holds). The jackknife variance over U is then

    V_U = eta^2 (B_U - 1) / B_U * sum_m (a_m - mean a)(b_m - mean b)

and ``se_total = sqrt(var_cond_e + max(V_U, 0))``. ``var_update`` reports V_U unclamped: unbiased
for a linear map, it can be < 0 when U adds little variance. The clamp biases se_total up a little
(variance ratio 0.78 against 0.82 over the same 200 (U, E) pairs at B_E = 8). That delete-one V_U is
the one "sgd" (a linear map) reports. Through a non-smooth map it errs high (Efron-Stein): a fresh
Adam is ``v ~ sign(g)``, 1.3-1.7x the variance over U on the toy policies; so every other rule reports
the delete-a-group V_U of ``update_groups`` (G = 4 blocks of U), formed in the same pass over the U
units (issue 23, docs/validation.md).

Memory: one unit's gradient at a time, turned in place into ``g_(-m)`` and then into ``v_(-m)``
(``build_direction`` builds v in the gradient's storage), next to v, a kept copy of grad J_U and the
two half sums of X: a constant number of parameter-sized buffers (five, six with the running sum of a
group for the non-linear rules), never B_U of them.

The per-unit pieces are the update-prompt influences (docs/design.md section 9): for "sgd" exactly
``eta Xbar_E . Y_m / B_U`` (they sum to ``delta_h1``), for the Adam directions the delete-one-unit
change ``delta_h1 - eta Xbar_E . v_(-m)``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .context import ProbeCall
from .direction import UpdateDirection, build_direction
from .distributed import all_reduce_vector
from .engines import unit_gradients
from .eval_statistics import EvalStatistics
from .result import UpdateVariance
from .update_groups import group_of, group_sizes, grouped_variance, n_groups
from .vectors import Vector


class UpdateJackknife(NamedTuple):
    """V_U (nats^2) and the per-unit influences ``(B_U,)`` float64 in gathered U-unit order."""

    var_update: float
    influence: Tensor


def eval_halves(n_local: int, offset: int) -> Tensor:
    """``(n_local,)`` half (0 = A, 1 = B) of each E unit: the parity of its global position, so that
    one or several ranks holding the same units split them the same way."""
    return (torch.arange(n_local) + offset) % 2


def half_sizes(n_eval: int) -> tuple[int, int]:
    """Units in half A (even global positions) and in half B (odd ones)."""
    return (n_eval + 1) // 2, n_eval // 2


class EvalHalves(NamedTuple):
    """The mean X over the two halves of E (fp32, parameter-shaped; the same on every rank) and their
    sizes. Independent given theta: a direction estimated on A and a forecast made on B (steering)."""

    x_a: Vector
    x_b: Vector
    sizes: tuple[int, int]


def half_means(call: ProbeCall, x_half: tuple[Vector, Vector], v: Vector, n_eval: int) -> EvalHalves:
    """``(Xbar_A, Xbar_B, (|A|, |B|))`` from this rank's half sums of X (one all-reduce each)."""
    n_half = half_sizes(n_eval)
    means = []
    sums = (all_reduce_vector(call.comm, x, call.params) for x in x_half)  # over all ranks
    for x, n in zip(sums, n_half):
        # in place: the probe owns the sums (a second copy of both halves would cost 2x the parameters)
        means.append(
            {name: torch.zeros_like(v[name]) if t is None else t.div_(max(n, 1)) for name, t in x.items()}
        )
    if n_half[1] == 0:  # B_E = 1: no second half; Xbar_E for both (V_U then keeps the E noise)
        means[1] = means[0]
    return EvalHalves(means[0], means[1], n_half)


def update_variance(
    call: ProbeCall, upd: UpdateDirection, halves: EvalHalves, stats: EvalStatistics
) -> UpdateVariance:
    """``result.update``: V_U, se_total and the update influences with the U unit ids in gathered order,
    from the half means of X (``half_means``) and the U that built ``upd``.

    V_U: the delete-one jackknife for "sgd" (a linear map: unbiased, B_U - 1 degrees of freedom), the
    delete-a-group jackknife (``update_groups``) for the other rules, whose maps are not linear."""
    x_a, x_b, n_half = halves
    ids = torch.zeros(0, dtype=torch.long, device="cpu") if upd.batch is None else upd.batch.unit_ids.cpu()
    sizes = [int(c) for c in call.comm.stack(torch.tensor([len(ids)], device="cpu")).reshape(-1).tolist()]
    grouped = call.config.direction != "sgd" and 2 <= n_groups(upd.n_units) < upd.n_units
    pieces, group_pieces = None, None
    if upd.n_units >= 2 and (upd.batch is not None or grouped):  # grouped: every rank joins the sums
        offset = sum(sizes[: call.comm.rank])  # this rank's first U unit in the gathered order
        pieces, group_pieces = deleted_unit_projections(call, upd, (x_a, x_b), offset, grouped)
    jack, ids = gathered_jackknife(call, ids, pieces, sizes, n_half, stats.delta_h1)
    var_update = jack.var_update
    if group_pieces is not None:
        var_update = grouped_variance(group_pieces, upd.n_units, call.lr)
    return UpdateVariance(
        n_update_units=upd.n_units,
        se_total=math.sqrt(stats.var_cond_e + max(var_update, 0.0)),
        var_update=var_update,
        update_influence=jack.influence,
        update_unit_ids=ids,
    )


def gathered_jackknife(
    call: ProbeCall,
    ids: Tensor,
    pieces: Tensor | None,
    sizes: list[int],
    n_half: tuple[int, int],
    delta_h1: float,
) -> tuple[UpdateJackknife, Tensor]:
    """Every rank's ``(B_U_local, 2)`` pieces gathered in rank order and combined; with the U unit ids.

    ``ids``: this rank's U unit ids; ``sizes``: the U units of every rank; ``pieces`` is None where no
    piece was computed (no U units on this rank, or B_U < 2: zeros)."""
    # host-side: the per-unit pieces are few float64 numbers, gathered and combined on the host
    comm = call.comm
    if pieces is None or len(pieces) != len(ids):
        pieces = torch.zeros((len(ids), 2), dtype=torch.float64, device="cpu")
    pieces, ids = comm.gather(pieces, sizes), comm.gather(ids, sizes)  # (B_U, 2), (B_U,)
    return combine(pieces, n_half, call.lr, delta_h1, call.config.direction), ids


def deleted_unit_projections(
    call: ProbeCall, upd: UpdateDirection, x_halves: tuple[Vector, Vector], offset: int, grouped: bool
) -> tuple[Tensor, Tensor | None]:
    """``(B_U_local, 2)`` float64 ``(Xbar_A . dv_m, Xbar_B . dv_m)`` for this rank's U units, in order,
    and with ``grouped`` the ``(G, 2)`` ``(Xbar_A . dv_k, Xbar_B . dv_k)`` of the groups of
    ``update_groups`` (else None).

    ``upd.grad_j`` is grad J_U over all ranks' units, ``upd.n_units`` = B_U over all ranks (>= 2); v_(-m)
    is normalised by ``call.v_lr`` as v was, so that v_(-m) and v are alike. ``offset``: the gathered
    position of this rank's first unit. With ``grouped`` every rank must call it (one all-reduce a group).
    """
    cfg, n_units, v = call.config, upd.n_units, upd.v
    rows, group_rows, acc, next_group = [], [], None, 0
    units = () if upd.batch is None else unit_gradients(call.module, call.params, upd.batch, upd.coeff, cfg)
    for m, g in units:
        if grouped:
            while next_group < group_of(offset + m, n_units):  # that group is complete on this rank
                group_rows.append(_group_projection(call, upd, acc, next_group, x_halves))
                acc, next_group = None, next_group + 1
            acc = _accumulate(acc, g, call.params)  # before g becomes g_(-m) in place
        for name, total in upd.grad_j.items():  # g_(-m) = (B_U grad J_U - g_m) / (B_U - 1), in place
            if total is None:
                g[name] = None
                continue
            gm = g[name]
            gm = torch.zeros_like(total) if gm is None else gm.float()
            g[name] = gm.neg_().add_(total, alpha=n_units).div_(n_units - 1)
        rows.append(_projections(call, g, v, x_halves))  # consumes g
        del g
    while grouped and next_group < n_groups(n_units):  # the groups after this rank's last unit
        group_rows.append(_group_projection(call, upd, acc, next_group, x_halves))
        acc, next_group = None, next_group + 1
    local = torch.stack(rows).cpu() if rows else torch.zeros((0, 2), dtype=torch.float64)  # (B_U_local, 2)
    return local, torch.stack(group_rows).cpu() if grouped else None  # (G, 2)


def _projections(call: ProbeCall, g_minus: dict, v: Vector, x_halves: tuple[Vector, Vector]) -> Tensor:
    """``(2,)`` float64 ``(Xbar_A . dv, Xbar_B . dv)``, ``dv = v(g_minus) - v``; consumes ``g_minus``."""
    cfg = call.config
    dv = build_direction(cfg.direction, g_minus, call.params, call.optimizer, call.v_lr, cfg.max_grad_norm).v
    for name in dv:  # dv = v_(-m) - v in v_(-m)'s storage, formed before the dots: dv is ~1/B_U of v,
        dv[name].sub_(v[name])  # a difference of two dots would lose it to rounding
    return torch.stack([_dot64(dv, x) for x in x_halves])


def _accumulate(acc: dict | None, g: dict, params) -> dict:
    """``acc += g`` (fp32, a copy the probe owns; None entries: no gradient yet)."""
    acc = {name: None for name in params} if acc is None else acc
    for name, t in g.items():
        if t is not None:
            acc[name] = t.float().clone() if acc[name] is None else acc[name].add_(t.float())
    return acc


def _group_projection(
    call: ProbeCall, upd: UpdateDirection, acc: dict | None, k: int, x_halves: tuple[Vector, Vector]
) -> Tensor:
    """Group k's ``(2,)`` projections: its gradient sum over all ranks (one all-reduce, every rank calls),
    ``g_(-k) = (B_U grad J_U - sum_k) / (B_U - d_k)`` formed in that sum's storage, then ``v_(-k)``."""
    n_units, d = upd.n_units, group_sizes(upd.n_units)[k]
    acc = {name: None for name in call.params} if acc is None else acc
    total = all_reduce_vector(call.comm, acc, call.params)  # over all ranks: a group may span ranks
    g = {}
    for name, grad_j in upd.grad_j.items():
        s = total.get(name)
        if grad_j is None:
            g[name] = None
            continue
        s = torch.zeros_like(grad_j) if s is None else s
        g[name] = s.neg_().add_(grad_j, alpha=n_units).div_(n_units - d)
    del total
    return _projections(call, g, upd.v, x_halves)


DOT_CHUNK = 1 << 20  # elements per float64 partial dot: temporaries stay small whatever the parameter size


def _dot64(a: Vector, b: Vector) -> Tensor:
    """``a . b`` accumulated in float64, in chunks so that the float64 temporaries stay small."""
    terms = []
    for name, t in a.items():
        x, y = t.reshape(-1), b[name].reshape(-1)  # (numel,)
        for i in range(0, x.numel(), DOT_CHUNK):
            terms.append(torch.vdot(x[i : i + DOT_CHUNK].double(), y[i : i + DOT_CHUNK].double()))
    return torch.stack(terms).sum()


def combine(
    pieces: Tensor, n_half: tuple[int, int], lr: float, delta_h1: float, direction: str
) -> UpdateJackknife:
    """V_U and the influences from the gathered ``(B_U, 2)`` projections (see the module docstring)."""
    n = pieces.shape[0]
    if n < 2:
        warnings.warn(
            "fewer than 2 update units: the variance over U cannot be estimated; se_total is "
            "reported as se_cond_e",
            RuntimeWarning,
            stacklevel=3,
        )
        return UpdateJackknife(0.0, torch.full((n,), delta_h1, dtype=torch.float64))
    a, b = pieces[:, 0], pieces[:, 1]
    cov = float(((a - a.mean()) * (b - b.mean())).sum())
    var_update = lr * lr * (n - 1) / n * cov  # unbiased for a linear map, so it may come out < 0
    xbar_dv = (n_half[0] * a + n_half[1] * b) / (n_half[0] + n_half[1])  # Xbar_E . dv_m
    if direction == "sgd":  # Y_m = v - (B_U - 1) dv_m exactly, so these sum to delta_h1
        influence = (delta_h1 - lr * (n - 1) * xbar_dv) / n
    else:
        influence = -lr * xbar_dv
    return UpdateJackknife(var_update, influence)

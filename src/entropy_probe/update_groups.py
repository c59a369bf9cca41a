"""V_U by a delete-a-group jackknife: what se_total uses for every direction map but "sgd" (issue 23).

docs/design.md section 7. The delete-one jackknife over U (``update_jackknife``) is unbiased for a linear
map, but through a non-smooth one it errs high (Efron-Stein): a fresh Adam is ``v ~ sign(g)``, and a
deleted unit moves ``g`` by only ``~ s / B_U``, so the coordinates near a tie flip and the jackknife's
factor ``B_U - 1`` amplifies those flips. The overshoot grows like ``sqrt(B_U)`` (2.1x at B_U = 8 on one
Gaussian coordinate at a tie, 1.3-1.7x on the toy policies, 1.9-2.1x at B_U = 16; docs/validation.md).

Deleting a group of ``d`` units instead moves ``g`` by ``~ s sqrt(d / (B_U (B_U - d)))``; with a fixed
number of groups ``G`` that perturbation stays a fixed fraction of the spread of ``g`` whatever B_U
(the delete-d jackknife is consistent for non-smooth statistics when ``d / B_U`` stays away from 0,
Shao and Wu 1989). The units are cut into ``G = min(N_GROUPS, B_U)`` contiguous blocks of the gathered
U order (sizes ``d_k`` differing by at most one; block k holds global positions p with
``p * G // B_U == k``). With ``dv_k = v_(-k) - v`` projected on the two halves of E,

    a_k = Xbar_A . dv_k,   b_k = Xbar_B . dv_k,
    V_U = eta^2 sum_k w_k (a_k - abar)(b_k - bbar),   w_k = (B_U - d_k)^2 / (d_k B_U (G - 1)),

abar, bbar the means weighted by ``B_U - d_k``. For a linear map that is the between-group ANOVA
estimate ``sum_k d_k (ybar_k - ybar)^2 / (B_U (G - 1))`` of var(ybar), unbiased (``ybar_k - ybar =
(B_U - d_k) / d_k * (ybar - ybar_(-k))``); with equal groups it is ``(G - 1)/G sum_k (..)(..)``, and with
G = B_U the delete-one jackknife. N_GROUPS = 4 (a group is a quarter of U, ``d / (B_U - d) = 1/3``): on
toy policies (seeds 1-4, exact grad H, 300-400 U each) it gave 0.93-1.10x the variance over U for a
fresh Adam, 0.82-1.00x for a warm one and 0.93-1.05x for the warm optimizer step, at B_U = 8 and 16
(docs/validation.md). The price is noise: V_U has
``G - 1 = 3`` degrees of freedom instead of ``B_U - 1``; "sgd", a linear map, keeps the delete-one
jackknife.

Cost: G more direction builds and, under DDP, G all-reduces of a parameter-sized vector (a group may
span ranks); no extra backward (each unit's gradient, already computed for its influence, is added to
the group's sum first) and one more parameter-sized buffer (the group's sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

N_GROUPS = 4


def n_groups(n_units: int) -> int:
    """G: N_GROUPS, or B_U when U has fewer units (then each group is one unit: the delete-one jackknife)."""
    return min(N_GROUPS, n_units)


def group_of(position: int, n_units: int) -> int:
    """The group of the U unit at global ``position`` (0-based, gathered order): contiguous blocks."""
    return position * n_groups(n_units) // n_units


def group_sizes(n_units: int) -> list[int]:
    """``d_k`` for k = 0 .. G-1."""
    sizes = [0] * n_groups(n_units)
    for p in range(n_units):
        sizes[group_of(p, n_units)] += 1
    return sizes


def grouped_variance(pieces: Tensor, n_units: int, lr: float) -> float:
    """V_U from the ``(G, 2)`` float64 ``(Xbar_A . dv_k, Xbar_B . dv_k)`` of the G groups (docstring)."""
    d = torch.tensor(group_sizes(n_units), dtype=torch.float64)  # (G,)
    g = d.numel()
    rest = n_units - d  # B_U - d_k: the units each replicate keeps
    centre = (rest[:, None] * pieces).sum(dim=0) / rest.sum()  # (2,): weighted means abar, bbar
    dev = pieces - centre  # (G, 2)
    w = rest.square() / (d * n_units * (g - 1))  # (G,)
    return lr * lr * float((w * dev[:, 0] * dev[:, 1]).sum())  # unbiased for a linear map: may be < 0

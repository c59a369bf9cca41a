"""Per-unit values of a ratio of means: the token-level entropy's change, by the delta method, with a
delete-one-unit jackknife bias correction.

For E units n = 1..B with N_n, D_n (numerator and denominator of the entropy) and dN_n, dD_n (their
derivatives along v), the plug-in derivative of ``H = Nbar / Dbar`` is

    dH = (dNbar - H dDbar) / Dbar

It is a smooth function of four means, so its bias is O(1/B) (about 1-4% at B = 8 on small models).
The delete-one-unit jackknife ``dH_J = B dH - (B - 1) mean_n dH_(-n)`` removes that term. The per-unit
values returned are

    s_n = dH_J + IF_n,   IF_n = [dN_n - H dD_n - (dDbar / Dbar)(N_n - H D_n) - dH D_n] / Dbar

where IF_n is the delta-method influence of unit n (its mean over n is 0 exactly), so ``mean_n s_n`` is the
corrected estimate and ``var(s_n) / B`` the delta-method variance: the statistics of DESIGN section 5 apply
to the s_n unchanged. Everything is linear in (dN, dD) given (N, D), so parameter groups (a trailing axis
on dN, dD) add up to the whole.

>>> import torch
>>> n, d = torch.tensor([3.0, 5.0, 4.0]), torch.tensor([2.0, 3.0, 2.5])
>>> dn, dd = torch.tensor([0.3, -0.1, 0.2]), torch.tensor([0.1, 0.0, -0.2])
>>> s = ratio_unit_values(dn, dd, n, d)
>>> h = n.sum() / d.sum()
>>> plug_in = float((dn.sum() - h * dd.sum()) / d.sum())
>>> abs(float(s.mean()) - float(ratio_jackknife(dn, dd, n, d))) < 1e-12
True
>>> abs(plug_in - float(ratio_plug_in(dn, dd, n, d))) < 1e-6
True
"""

from __future__ import annotations

from torch import Tensor


def _per_unit(n: Tensor, d: Tensor, dn: Tensor) -> tuple[Tensor, Tensor]:
    """N, D as float64, with a trailing axis when dN carries parameter groups ``(..., B, K)``."""
    n, d = n.double(), d.double()
    if dn.dim() == n.dim() + 1:
        n, d = n.unsqueeze(-1), d.unsqueeze(-1)
    return n, d


def _unit_axis(n: Tensor, dn: Tensor) -> int:
    return n.dim() - 1 - dn.dim()  # negative index of the unit axis B in dN


def ratio_plug_in(dn: Tensor, dd: Tensor, n: Tensor, d: Tensor) -> Tensor:
    """``(dNbar - H dDbar) / Dbar`` over the unit axis (float64; ``(...)`` or ``(..., K)``)."""
    ax = _unit_axis(n, dn)
    n, d = _per_unit(n, d, dn)
    dn, dd = dn.double(), dd.double()
    h = n.sum(ax) / d.sum(ax)
    return (dn.sum(ax) - h * dd.sum(ax)) / d.sum(ax)


def ratio_deleted(dn: Tensor, dd: Tensor, n: Tensor, d: Tensor) -> Tensor:
    """The plug-in with unit n left out, for every n: same shape as dN."""
    ax = _unit_axis(n, dn)
    n, d = _per_unit(n, d, dn)
    dn, dd = dn.double(), dd.double()
    sn, sd, sdn, sdd = (x.sum(ax, keepdim=True) - x for x in (n, d, dn, dd))  # sums without unit n
    return (sdn - (sn / sd) * sdd) / sd


def ratio_jackknife(dn: Tensor, dd: Tensor, n: Tensor, d: Tensor) -> Tensor:
    """``B dH - (B - 1) mean_n dH_(-n)``: the plug-in with its O(1/B) bias removed."""
    ax = _unit_axis(n, dn)
    b = dn.shape[ax]
    return b * ratio_plug_in(dn, dd, n, d) - (b - 1) * ratio_deleted(dn, dd, n, d).mean(ax)


def ratio_unit_values(dn: Tensor, dd: Tensor, n: Tensor, d: Tensor) -> Tensor:
    """s_n (module docstring), float64, shaped like dN: mean = jackknife-corrected dH, variance = delta's.

    Needs B >= 2 units (the jackknife deletes one).
    """
    ax = _unit_axis(n, dn)
    if dn.shape[ax] < 2:
        raise ValueError(
            f"eval_batch: the token-level entropy's ratio needs at least 2 evaluation units, "
            f"got {dn.shape[ax]}"
        )
    n_, d_ = _per_unit(n, d, dn)
    dn_, dd_ = dn.double(), dd.double()
    dbar = d_.mean(ax, keepdim=True)
    h = n_.mean(ax, keepdim=True) / dbar
    dh = (dn_.mean(ax, keepdim=True) - h * dd_.mean(ax, keepdim=True)) / dbar
    influence = (dn_ - h * dd_ - (dd_.mean(ax, keepdim=True) / dbar) * (n_ - h * d_) - dh * d_) / dbar
    return ratio_jackknife(dn, dd, n, d).unsqueeze(ax) + influence


def entropy_jackknife(n: Tensor, d: Tensor) -> Tensor:
    """``B H - (B - 1) mean_n H_(-n)`` of ``H = Nbar / Dbar``: the entropy with its O(1/B) bias removed."""
    n, d = n.double(), d.double()
    b = n.shape[-1]
    deleted = (n.sum(-1, keepdim=True) - n) / (d.sum(-1, keepdim=True) - d)
    return b * n.sum(-1) / d.sum(-1) - (b - 1) * deleted.mean(-1)

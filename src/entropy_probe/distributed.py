"""Communication of the probe: one process, or the ranks of a DDP-wrapped model (DESIGN section 9).

The probe calls only the communicator's methods, so that one process and N ranks run the same code:

- ``check_same(what, fields, error)``: every rank passes the same fingerprint (config, parameter
  names and shapes, the call's mode; ``fields()`` builds it, only when there are several ranks),
  else a ValueError on every rank; a rank whose local input checks failed (``error``) makes every
  rank raise instead of leaving the others waiting;
- ``stack(t)``: ``(world, *t.shape)``, every rank's t in rank order (one all_gather);
- ``gather(t, sizes=None)``: the concatenation over ranks, in rank order, of tensors whose first
  dimension differs between ranks (the sizes are gathered first unless given; padded all_gather);
- ``sum_(tensors)``: in-place all-reduce (sum) of each tensor.

On top of them, the three reductions the probe performs (section 9 of the design):
``global_totals`` (loss normalisers of U), ``all_reduce_vector`` (gradient sums: one flat fp32
buffer, one all-reduce) and ``merged_moments`` (float64 (count, mean, M2) per rank merged with
Chan's formula, in rank order, so every rank gets the same bits).

Under DDP the probe runs the *unwrapped* module and differentiates with ``torch.autograd.grad``:
DDP's forward (buffer broadcast), its autograd hooks and its reducer never run, so no gradient
synchronisation happens inside the probe and the caller's next DDP backward is unaffected. Every
collective uses the process group's timeout: ``init_process_group(backend, timeout=timedelta(...))``.

Run the distributed example with ``torchrun --nproc_per_node=2 examples/ddp_probe.py``.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .objectives import UpdateTotals
from .statistics import Moments, moments_merge
from .vectors import Params

Vector = dict[str, "Tensor | None"]  # a vector whose entries may be None (a parameter no gradient reached)


class Communicator(Protocol):
    """What the probe asks of a communicator (module docstring): ``SingleProcess`` or ``ProcessGroupComm``."""

    rank: int
    world_size: int

    def check_same(self, what: str, fields: Callable[[], dict], error: Exception | None = None) -> None: ...

    def stack(self, t: Tensor) -> Tensor: ...

    def gather(self, t: Tensor, sizes: Sequence[int] | None = None) -> Tensor: ...

    def sum_(self, tensors: list[Tensor]) -> None: ...


class SingleProcess:
    """The communicator of a single process: every collective is the identity."""

    rank = 0
    world_size = 1

    def check_same(self, what: str, fields: Callable[[], dict], error: Exception | None = None) -> None:
        if error is not None:
            raise error

    def stack(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0)

    def gather(self, t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
        return t

    def sum_(self, tensors: list[Tensor]) -> None:
        pass


def fingerprint_hash(value) -> int:
    """A 63-bit hash of ``repr(value)``, the same in every process (unlike ``hash()``, salted per process)."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ProcessGroupComm:
    """The communicator of a ``torch.distributed`` process group (the DDP model's group).

    Collectives run on the device the backend needs (CUDA for nccl, CPU for gloo); results come back
    on the caller's device. Every collective is a plain blocking call, so the process group's
    timeout bounds it.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "EntropyProbe: the model is DDP-wrapped but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first"
            )
        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )

    # ---- primitives ---------------------------------------------------------------------------
    def stack(self, t: Tensor) -> Tensor:
        x = t.detach().to(self.device).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        self.dist.all_gather(out, x, group=self.group)
        return torch.stack(out).to(t.device)  # (world, *t.shape)

    def gather(self, t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
        if sizes is None:
            sizes = self.stack(torch.tensor([t.shape[0]], dtype=torch.int64)).reshape(-1).tolist()
        sizes = [int(n) for n in sizes]
        if sizes[self.rank] != t.shape[0]:
            raise ValueError(
                f"gather: rank {self.rank} holds {t.shape[0]} rows but the sizes say {sizes[self.rank]}"
            )
        longest = max(sizes)
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t.detach().to(self.device)
        rows = self.stack(padded)  # (world, longest, ...)
        return torch.cat([rows[r, :n] for r, n in enumerate(sizes)]).to(t.device)

    def sum_(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            buf = t if t.device == self.device else t.to(self.device)
            self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM, group=self.group)
            if buf is not t:
                t.copy_(buf)

    # ---- agreement ----------------------------------------------------------------------------
    def check_same(self, what: str, fields: Callable[[], dict], error: Exception | None = None) -> None:
        """One all_gather of ``[error flag, hash(field) ...]``; raise on every rank if any rank differs.

        Each rank names its own value in the message, so the logs of two ranks side by side show
        both. Runs before any other collective of a probe call, so a disagreement never hangs.
        ``fields()`` must return the same keys on every rank (``call_fingerprint`` does).
        """
        fields = fields()
        names = list(fields)
        mine = torch.tensor(
            [int(error is not None)] + [fingerprint_hash(fields[k]) for k in names], dtype=torch.int64
        )
        table = self.stack(mine)  # (world, 1 + len(fields))
        failed = table[:, 0].nonzero().reshape(-1).tolist()
        if error is not None:
            raise error
        if failed:
            raise ValueError(
                f"{what}: rank(s) {failed} of {self.world_size} failed their input checks (see the "
                f"error on those ranks); rank {self.rank} stops too instead of waiting for them"
            )
        for j, name in enumerate(names, start=1):
            differ = (table[:, j] != table[0, j]).nonzero().reshape(-1).tolist()
            if differ:
                raise ValueError(
                    f"{what}: the ranks disagree on {name}: ranks {differ} differ from rank 0; rank "
                    f"{self.rank} has {fields[name]!r}. Every rank must call the probe the same way."
                )


# ---- which communicator ---------------------------------------------------------------------
def _is_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _is_sharded(model: nn.Module) -> bool:
    """FSDP2 (``fully_shard``) or any DTensor-sharded parameter."""
    try:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return True
    except ImportError:
        pass
    try:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in model.parameters())
    except ImportError:
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any ``.module`` wrapper such as DataParallel)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def communicator_for(model: nn.Module, process_group=None) -> Communicator:
    """``ProcessGroupComm`` of ``process_group`` when given, else of the DDP model's process group or of
    an FSDP2 model's device mesh (``fsdp``); ``SingleProcess`` for a plain module.

    A plain module under torchrun is probed per rank, independently (nothing is communicated), unless
    a ``process_group`` is given (a trainer that hands over the unwrapped model: ``integrations.trl``).
    """
    if _is_fsdp1(model):
        raise ValueError(
            "EntropyProbe: FullyShardedDataParallel (FSDP1) is not supported: use FSDP2 "
            "(torch.distributed.fsdp.fully_shard) with run(eval_batch=E, from_grad=True), or "
            "DistributedDataParallel (docs/distributed.md, FSDP)"
        )
    if process_group is not None:
        return ProcessGroupComm(process_group)
    if _is_sharded(model):
        from .fsdp import fsdp2_group  # lazy: torch.distributed.fsdp is imported only for a sharded model

        return ProcessGroupComm(fsdp2_group(model))
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return ProcessGroupComm(model.process_group)
    return SingleProcess()


# ---- the probe's reductions -------------------------------------------------------------------
def global_totals(comm: Communicator, local: UpdateTotals) -> UpdateTotals:
    """The loss normalisers over every rank's U units (sums; the max length is a max).
    One all_gather of four integers."""
    mine = torch.tensor(
        [local.n_units, local.n_sequences, local.n_tokens, local.max_length], dtype=torch.int64
    )
    table = comm.stack(mine)  # (world, 4)
    n_units, n_sequences, n_tokens = (int(x) for x in table[:, :3].sum(dim=0))
    return UpdateTotals(n_units, n_sequences, n_tokens, int(table[:, 3].max()))


def all_reduce_vector(comm: Communicator, vec: Vector, params: Params) -> Vector:
    """The sum over ranks of a parameter-keyed fp32 vector (None: nothing reached it on this rank).

    One flat fp32 buffer, ``numel + number of tensors`` long, one all-reduce; the trailing entries
    count the ranks where each tensor was present, so a parameter no rank reached stays None. The
    returned tensors are views of the buffer: every rank holds the same bits. ``vec`` is emptied
    (its tensors are copied into the buffer and released).
    """
    if comm.world_size == 1:
        return vec
    names = list(params)
    numels = [params[n].numel() for n in names]
    total = sum(numels)
    flat = torch.zeros(
        total + len(names), dtype=torch.float32, device=params[names[0]].device
    )  # (P + n_tensors,)
    offset = 0
    for i, (name, n) in enumerate(zip(names, numels)):
        g = vec.get(name)
        if g is not None:
            flat[offset : offset + n] = g.reshape(-1)  # (numel,)
            flat[total + i] = 1.0
        offset += n
    vec.clear()  # release the per-rank sums: the buffer now holds them
    comm.sum_([flat])
    present = (flat[total:] > 0).tolist()  # one host sync, not one per parameter
    out: Vector = {}
    offset = 0
    for name, n, here in zip(names, numels, present):
        out[name] = flat[offset : offset + n].view(params[name].shape) if here else None
        offset += n
    return out


def merged_moments(comm: Communicator, local: Moments, extra: Tensor) -> tuple[Moments, Tensor, list[int]]:
    """Chan-merged float64 moments over ranks (rank order), ``extra`` summed, and each rank's count.

    One all_gather of ``(3 + len(extra))`` float64 numbers per rank.
    """
    mine = torch.cat([torch.stack([local.count, local.mean, local.m2]).double().cpu(), extra.double().cpu()])
    table = comm.stack(mine)  # (world, 3 + len(extra))
    merged = Moments(*(torch.zeros((), dtype=torch.float64) for _ in range(3)))
    for r in range(table.shape[0]):
        merged = moments_merge(merged, Moments(table[r, 0], table[r, 1], table[r, 2]))
    return merged, table[:, 3:].sum(dim=0), [int(c) for c in table[:, 0].tolist()]


FINGERPRINT_FIELDS = (
    "the call",
    "ProbeConfig",
    "learning rate",
    "trainable parameters",
    "optimizer",
    "direction",
    "gradient",
)


def call_fingerprint(
    call: str,
    config,
    lr: float | None,
    params: Params | None,
    optimizer,
    given: dict[str, Tensor] | None,
    grads: list | None = None,
) -> dict:
    """What every rank's probe call must agree on (``check_same``), ``FINGERPRINT_FIELDS`` in order.

    ``call`` names the call and its mode (update batch, given direction or from_grad; truth); a given
    direction
    enters by its names, shapes and float64 checksums, so that ranks holding different v raise
    instead of silently reporting different results.
    """
    fields = dict.fromkeys(FINGERPRINT_FIELDS)
    fields["the call"] = call
    fields["ProbeConfig"] = config.to_dict()
    fields["learning rate"] = lr
    if params is not None:
        fields["trainable parameters"] = [(name, tuple(p.shape), str(p.dtype)) for name, p in params.items()]
    if optimizer is not None:
        fields["optimizer"] = (type(optimizer).__name__, [len(g["params"]) for g in optimizer.param_groups])
    if given is not None:
        sums = torch.stack(
            [torch.stack([t.double().sum(), t.double().square().sum()]) for t in given.values()]
        )
        fields["direction"] = list(zip(given, [tuple(t.shape) for t in given.values()], sums.tolist()))
    # from_grad: the .grad DDP averaged must be the same on every rank (from_grad.grad_checksums)
    fields["gradient"] = grads
    return fields

"""Units over processes: curvi's sums over units, all-reduced with torch.distributed.

Under ``torchrun --nproc-per-node K`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) each process
holds a contiguous block of the units: the model takes its block from
:func:`local_units` and keeps only those units' observations. Everything
per unit -- data, conditional modes, Hessian blocks Dᵢ and Bᵢ, log|Dᵢ|, the
quadrature -- stays on its process; what crosses processes is p × p and
p-sized (docs/design.md §13):

* the Schur sum ``A − Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ`` before it is repaired and factored
  (:func:`sum_over_ranks`, differentiable: its backward sums the gradient
  back over the processes);
* the objective's value and its gradient in the global parameters
  (:func:`sum_values`, :func:`sum_gradients`).

**Shares.** Each process evaluates its *share* of every objective: its
units' terms in full and the terms every process computes alike (the
globals' prior, their Jacobians, q(θ)'s density) divided by K, so that the
shares sum to the whole. The gradient of a share, summed over processes, is
the gradient of the whole; every process then holds the same value,
gradient and Schur complement and takes the same step, so θ̂ stays identical
everywhere.

**Noise.** θ's noise comes from generators seeded alike on every process;
unit i's noise from a generator keyed by its global index
(:func:`unit_normal`), so a draw does not depend on how many processes
share the units: results match a single process's to rounding.

**Failures.** Every collective runs with a timeout (``CURVI_TIMEOUT``
seconds, default 300) and a failed one -- another process raised and
exited, was killed, or timed out -- raises :class:`RankFailure` naming this
process and the operation it was waiting in, never a hang.

**Supported.** :class:`~curvi.guides.AmortizedLaplaceGuide` fitted by
:func:`curvi.fit` with its default optimiser
(:class:`~curvi.laplace_newton.LaplaceNewton`, also with ``quadrature=``),
:func:`curvi.laplace_mle`, :func:`curvi.laplace_mode` and
:class:`~curvi.model.ModelView`'s sums; other optimisers, ``LaplaceGuide``
and several grouping factors are refused by name under several processes.
Observed sites and factors are the process's own data: an observation that
belongs to no unit must be added by one process only.

The script below runs as it is (one process: ``local_units`` returns every
unit) and unchanged as ``torchrun --nproc-per-node 2 script.py``, where each
process prints the same result.

Usage::

    import torch, pyro, pyro.distributions as dist
    import curvi

    N = 1000
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.full((N, 4), 3.0, dtype=torch.float64), generator=g)
    units = curvi.local_units(N)          # this process's units
    obs = counts[units]                   # only their observations

    def model(obs):
        zero = torch.zeros(1, dtype=torch.float64)
        mu = pyro.sample("mu", dist.Normal(zero, 5.0).to_event(1))
        with pyro.plate("units", obs.shape[0], dim=-2):
            u = pyro.sample("u", dist.Normal(mu, 1.0))
            with pyro.plate("obs", obs.shape[1], dim=-1):
                pyro.sample("z", dist.Poisson(u.exp()), obs=obs)

    guide = curvi.AmortizedLaplaceGuide(model, unit_plate="units")
    result = curvi.fit(model, guide, obs, progress=False)
    print(result.message, guide.loc_global)   # the same on every process
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "RankFailure",
    "is_sharded",
    "local_units",
    "rank",
    "traffic",
    "unit_normal",
    "world_size",
]
# the collectives below (sum_over_ranks, sum_values, sum_gradients, any_rank,
# broadcast, gather_units, ...) are curvi's own: identities in one process,
# checked against one process by tests/test_distributed.py

#: units per block of :func:`unit_normal`'s keyed generators
NOISE_BLOCK = 1024
_DEFAULT_TIMEOUT = 300.0

# the units this process was given by local_units: (num_units, start, stop)
_shard: dict[str, int] = {}
_started = {"by_curvi": False}  # whether curvi made the process group (with its timeout)


class RankFailure(RuntimeError):
    """A collective operation failed: another process raised and ended, was
    killed, or did not arrive within the timeout."""


# ---------------------------------------------------------------------------
# the process group


def _launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("CURVI_TIMEOUT", str(_DEFAULT_TIMEOUT))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"CURVI_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"CURVI_TIMEOUT must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _timeout_text() -> str:
    if _started["by_curvi"]:
        return f"{_timeout().total_seconds():g} s, CURVI_TIMEOUT"
    return "the process group's own, set by the script that started it"


def initialize() -> None:
    """Join the process group the launcher describes (gloo; NCCL when every
    process has a GPU), with curvi's timeout. Does nothing when the group is
    already initialised (by the user's own script) or when the process was
    not launched as one of several."""
    if not dist.is_available() or dist.is_initialized() or not _launched():
        return
    # gloo for CPU tensors (curvi's sums of floats), NCCL for CUDA tensors where there are GPUs
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=_timeout())
    _started["by_curvi"] = True
    atexit.register(_leave)  # curvi joined the group: it leaves it at exit, cleanly


def _leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes sharing the units (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_sharded() -> bool:
    """Whether the units are shared among several processes: the process
    group has more than one process and the model took its units from
    :func:`local_units`."""
    return world_size() > 1 and bool(_shard)


def local_units(num_units: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """This process's units: a LongTensor of unit indices, one contiguous
    block of ``range(num_units)`` per process (every unit when not
    distributed). A model run under ``torchrun`` keeps only these units'
    data; curvi sums what crosses units over the processes.

    Joins the process group the launcher describes if the script has not.

    Usage::

        units = local_units(10)   # tensor([0, ..., 9]) in one process;
                                  # under 2 processes [0..4] on rank 0, [5..9] on rank 1
    """
    if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
        raise ValueError(f"num_units must be a positive integer, got {num_units!r}")
    initialize()
    K, r = world_size(), rank()
    if num_units < K:
        raise ValueError(f"num_units={num_units} is smaller than the number of processes ({K})")
    start, stop = r * num_units // K, (r + 1) * num_units // K
    if K > 1:
        if _shard and _shard["num_units"] != num_units:
            raise ValueError(
                f"local_units was called with num_units={num_units} after num_units="
                f"{_shard['num_units']}: curvi shards one unit plate"
            )
        _shard.update(num_units=num_units, start=start, stop=stop)
    return torch.arange(start, stop, device=device)


def unit_offset() -> int:
    """Global index of this process's first unit (0 when not sharded)."""
    return _shard["start"] if is_sharded() else 0


def check_units(plate: str, num_present: int) -> None:
    """Refuse a unit plate that does not hold this process's units."""
    if not is_sharded():
        if world_size() > 1:
            raise ValueError(
                f"{world_size()} processes run this model but it did not take its units from "
                "curvi.local_units(num_units): each process must hold only its own units' data "
                f"in plate '{plate}'"
            )
        return
    expected = _shard["stop"] - _shard["start"]
    if num_present != expected:
        raise ValueError(
            f"under torch.distributed plate '{plate}' must hold this process's units "
            f"(curvi.local_units({_shard['num_units']}): {expected} units on rank {rank()}), "
            f"got {num_present}"
        )


def replicated_weight() -> float:
    """The weight of the terms every process computes alike: 1/K, so that
    the processes' shares sum to one of each (1 when not sharded)."""
    return 1.0 / world_size() if is_sharded() else 1.0


_inside = {"depth": 0}


@contextlib.contextmanager
def evaluating_shares():
    """Within this context a Laplace guide may be run when the units are
    shared: curvi's own losses enter it, as they weigh each site's share
    and sum over the processes (Pyro's ``Trace_ELBO`` would not)."""
    _inside["depth"] += 1
    try:
        yield
    finally:
        _inside["depth"] -= 1


def check_guide_call(name: str) -> None:
    """Refuse a recorded guide call (an ELBO's, Predictive's) outside curvi's
    losses when the units are shared."""
    if is_sharded() and not _inside["depth"]:
        raise ValueError(
            f"{name} is run outside curvi's losses while {world_size()} processes share the units: "
            "Pyro's ELBOs, SVI with another optimiser and Predictive would see this process's "
            "units only; fit with curvi.fit (LaplaceNewton, the guide's default)"
        )


# ---------------------------------------------------------------------------
# collectives


#: what this process has sent through collectives: ``calls`` and ``bytes``
#: (each all-reduce, broadcast or gather counted once with its tensor's size)
traffic = {"calls": 0, "bytes": 0}


def _count(tensor: torch.Tensor) -> None:
    traffic["calls"] += 1
    traffic["bytes"] += tensor.numel() * tensor.element_size()


def _all_reduce(tensor: torch.Tensor, what: str, op=None) -> torch.Tensor:
    _count(tensor)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    except Exception as error:  # gloo raises RuntimeError / DistBackendError subclasses
        raise RankFailure(
            f"rank {rank()} of {world_size()}: summing {what} over the processes failed: another "
            f"process raised and ended, was killed, or did not arrive within the timeout "
            f"({_timeout_text()}); its own error says why ({error})"
        ) from error
    return tensor


class _SumOverRanks(torch.autograd.Function):
    """Sum over processes; its backward sums the incoming gradient too (each
    process's upstream gradient is the gradient of its share)."""

    @staticmethod
    def forward(ctx, x, what):
        ctx.what = what
        return _all_reduce(x.clone(), what)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), f"the gradient of {ctx.what}"), None


def sum_over_ranks(x: torch.Tensor, what: str = "a sum over units") -> torch.Tensor:
    """``Σ`` over processes of ``x`` (each process's sum over its units),
    differentiable; ``x`` itself when not sharded."""
    if not is_sharded():
        return x
    return _SumOverRanks.apply(x, what)


def schur_sum(x: torch.Tensor) -> torch.Tensor:
    """The Schur complement ``A − Σᵢ Bᵢᵀ Dᵢ⁻¹ Bᵢ`` from the processes' pieces
    (:class:`~curvi.arrowhead.ArrowheadPrecision`'s ``reduce``)."""
    return sum_over_ranks(x, "the Schur complement A - sum_i B_i^T D_i^-1 B_i")


def sum_values(*values: float | torch.Tensor, what: str = "the objective") -> list[float]:
    """Shares summed over processes, as floats (one collective)."""
    if not is_sharded():
        return [float(v.detach() if torch.is_tensor(v) else v) for v in values]
    buffer = torch.tensor(
        [float(v.detach() if torch.is_tensor(v) else v) for v in values], dtype=torch.float64
    )
    return _all_reduce(buffer, what).tolist()


def sum_tensor(x: torch.Tensor, what: str = "the objective") -> torch.Tensor:
    """A detached tensor of shares summed over processes."""
    if not is_sharded():
        return x
    return _all_reduce(x.detach().clone(), what)


def sum_gradients(params: Iterable[torch.Tensor], what: str = "the gradient") -> None:
    """Sum the ``.grad`` of ``params`` over processes in place (one
    collective). A parameter with no gradient on some process counts as zero
    there; one with no gradient on any process keeps none."""
    if not is_sharded():
        return
    params = list(params)
    if not params:
        return
    flat = [p.grad.reshape(-1) if p.grad is not None else p.detach().new_zeros(p.numel()) for p in params]
    present = params[0].detach().new_tensor([float(p.grad is not None) for p in params])
    total = _all_reduce(torch.cat(flat + [present.to(flat[0].dtype)]), what)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        piece = total[offset : offset + n].reshape(p.shape)
        offset += n
        if total[-len(params) + i] == 0:
            continue  # no process has a gradient for it
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)


def any_rank(flag: bool, what: str) -> bool:
    """Whether ``flag`` holds on any process (one collective)."""
    if not is_sharded():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(_all_reduce(t, what, op=dist.ReduceOp.MAX).item() > 0)


def gather_units(x: torch.Tensor, what: str = "per-unit state") -> torch.Tensor:
    """The rows of every process's units in global order (axis 0), on every
    process: for checkpoints, which hold what a single process would."""
    if not is_sharded():
        return x
    K, N = world_size(), _shard["num_units"]
    width = (N + K - 1) // K
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(K)]
    _count(padded)
    try:
        dist.all_gather(pieces, padded.contiguous())
    except Exception as error:
        raise RankFailure(f"rank {rank()} of {K}: gathering {what} failed ({error})") from error
    rows = [pieces[r][: (r + 1) * N // K - r * N // K] for r in range(K)]
    return torch.cat(rows)


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a per-unit tensor over every unit (axis 0)."""
    if not is_sharded():
        return x
    return x[_shard["start"] : _shard["stop"]]


@contextlib.contextmanager
def _from_rank_zero(what: str):
    """A failed receive from rank 0 as a :class:`RankFailure` naming it."""
    try:
        yield
    except Exception as error:  # gloo raises RuntimeError / DistBackendError subclasses
        raise RankFailure(
            f"rank {rank()} of {world_size()}: receiving {what} from rank 0 failed ({error})"
        ) from error


def broadcast(x: torch.Tensor, what: str) -> torch.Tensor:
    """Rank 0's ``x`` on every process (a copy; ``x`` itself when not sharded):
    for starting points that processes must share."""
    if not is_sharded():
        return x
    y = x.detach().clone().contiguous()
    _count(y)
    with _from_rank_zero(what):
        dist.broadcast(y, src=0)
    return y


def broadcast_object(obj, what: str):
    """Rank 0's picklable ``obj`` on every process (``obj`` when not
    sharded): a checkpoint read where only rank 0 may see the file."""
    if not is_sharded():
        return obj
    box = [obj if rank() == 0 else None]
    with _from_rank_zero(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(what: str) -> None:
    """Wait for every process (e.g. until rank 0 has written a file)."""
    if is_sharded():
        any_rank(False, what)


# ---------------------------------------------------------------------------
# noise keyed by the global unit index


def unit_normal(
    seed: int, units: torch.Tensor, shape: torch.Size, unit_axis: int, *, dtype, device
) -> torch.Tensor:
    """Standard-normal noise of ``shape`` whose slice along ``unit_axis``
    for unit ``units[j]`` (a global index) depends only on ``seed`` and that
    index: units are drawn in blocks of :data:`NOISE_BLOCK` from generators
    seeded by ``(seed, block)``, so the same unit gets the same noise
    whichever process draws it, and a process draws only its own blocks.

    Usage::

        a = unit_normal(3, torch.arange(10), (4, 10, 2), 1, dtype=torch.float64, device="cpu")
        b = unit_normal(3, torch.arange(5, 10), (4, 5, 2), 1, dtype=torch.float64, device="cpu")
        assert torch.equal(a[:, 5:], b)
    """
    shape = torch.Size(shape)
    if not -len(shape) <= unit_axis < len(shape):
        raise ValueError(f"unit_axis {unit_axis} is not an axis of shape {tuple(shape)}")
    unit_axis = unit_axis % len(shape)
    if units.dim() != 1 or units.numel() != shape[unit_axis]:
        raise ValueError(
            f"units must be a 1-d tensor of the {shape[unit_axis]} global indices along axis {unit_axis} "
            f"of shape {tuple(shape)}, got shape {tuple(units.shape)}"
        )
    if units.numel() and int(units.min()) < 0:
        raise ValueError("units must be non-negative global unit indices")
    rest = shape[:unit_axis] + shape[unit_axis + 1 :]
    units = units.to("cpu")
    out = torch.empty((units.numel(),) + rest, dtype=dtype, device=device)
    blocks = torch.div(units, NOISE_BLOCK, rounding_mode="floor")
    generator = torch.Generator(device=device)
    for b in torch.unique(blocks).tolist():
        generator.manual_seed((int(seed) * 1_000_003 + 7_919 * b + 1) % (2**63 - 1))
        drawn = torch.randn((NOISE_BLOCK,) + rest, generator=generator, dtype=dtype, device=device)
        rows = (blocks == b).nonzero().reshape(-1)
        out[rows.to(device)] = drawn[(units[rows] - b * NOISE_BLOCK).to(device)]
    return out.movedim(0, unit_axis)

"""Run Pyro's SVI to convergence, with a progress bar and exact checkpoint/resume.

:func:`fit` is a thin driver around :class:`pyro.infer.SVI`: it takes the
steps, decides when the ELBO has stopped improving (:func:`elbo_converged`,
a test that allows for Monte-Carlo noise), and returns a :class:`FitResult`.

Given a ``checkpoint`` path it saves everything the next step depends on --
the parameter store, the optimiser state, the ``state_dict`` of a model or
guide that is a :class:`torch.nn.Module` (buffers included) and the random
number generators -- so that a fit interrupted at step ``k`` and resumed
continues bitwise as if it had never stopped.

Usage::

    import os, tempfile
    import torch, pyro, pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal
    from curvi.fit import fit

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    x = torch.randn(20) + 3.0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fit.pt")
        pyro.clear_param_store()
        first = fit(model, AutoNormal(model), x, steps=30, checkpoint=path,
                    tol=None, progress=False)

        pyro.clear_param_store()  # as in a new process: new guide, same file
        resumed = fit(model, AutoNormal(model), x, steps=60, checkpoint=path,
                      tol=None, progress=False)
    assert resumed.elbo[:30] == first.elbo and resumed.num_evaluations == 60
    print(resumed.message)  # reached steps=60 (resumed from ... at step 30)
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.optim
import pyro.poutine as poutine
import pyro.util
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import torch_item, zero_grads
from tqdm.auto import tqdm

from . import distributed
from .checks import check_count, check_positive
from .tensor_ops import rng_state, set_rng_state

__all__ = ["FitOutcome", "FitResult", "elbo_converged", "fit"]

_FORMAT = "curvi.fit checkpoint 1"
_KEYS = ("format", "step", "elbo", "param_store", "optim", "modules", "rng")


class FitOutcome(NamedTuple):
    """How an optimiser that decides its own stopping ended (the protocol of
    :func:`fit`: such an optimiser has an attribute ``outcome``, ``None``
    while it runs).

    Usage::

        import torch, pyro, pyro.distributions as dist
        from curvi import AmortizedLaplaceGuide, FitOutcome, LaplaceNewton, fit

        def model(obs):
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            with pyro.plate("groups", obs.shape[0], dim=-2):
                u = pyro.sample("u", dist.Normal(mu, 1.0))
                with pyro.plate("obs", obs.shape[1], dim=-1):
                    pyro.sample("z", dist.Normal(u, 0.5), obs=obs)

        pyro.clear_param_store()
        obs = torch.randn(6, 3)
        optim = LaplaceNewton(blocks=2)
        result = fit(model, AmortizedLaplaceGuide(model, unit_plate="groups"), obs,
                     optim=optim, progress=False)
        assert isinstance(optim.outcome, FitOutcome)
        assert result.final_elbo == optim.outcome.elbo

    :ivar bool converged: whether it met its convergence test.
    :ivar str message: a one-line summary.
    :ivar float elbo: its final ELBO estimate.
    :ivar float elbo_se: the Monte Carlo standard error of ``elbo``.
    :ivar dict info: anything else it reports (e.g. ``theta_se``).
    """

    converged: bool
    message: str
    elbo: float
    elbo_se: float
    info: dict


class FitResult(NamedTuple):
    """What :func:`fit` did.

    :ivar list elbo: the ELBO estimate (``-loss``) of every loss-and-gradient
        evaluation (SVI step), including those taken before a resume.
    :ivar bool converged: whether the fit met its convergence test
        (:func:`elbo_converged`, or the optimiser's own); never true for a fit
        that diverged or settled below its best ELBO.
    :ivar int num_evaluations: loss-and-gradient evaluations (SVI steps) in all.
    :ivar str message: why the fit stopped, e.g. ``"converged after 350
        evaluations"``, ``"reached steps=2000"``, ``"diverged: ..."``,
        followed by ``" (resumed from PATH at step K)"`` when the fit was
        resumed from a checkpoint.
    :ivar float final_elbo: the final ELBO estimate: the optimiser's own
        when it reports one, else the mean of the last ``window`` steps.
    :ivar float final_elbo_se: its Monte Carlo standard error (for the
        windowed mean, from the steps' successive differences).
    :ivar dict info: what the optimiser reported besides (empty for Pyro's).
    """

    elbo: list
    converged: bool
    num_evaluations: int
    message: str
    final_elbo: float
    final_elbo_se: float = math.nan
    info: dict = {}

    def __repr__(self):
        return (
            f"FitResult(converged={self.converged}, num_evaluations={self.num_evaluations}, "
            f"final_elbo={self.final_elbo:.6g} ± {self.final_elbo_se:.2g}, "
            f"message={self.message!r}, elbo=<{len(self.elbo)} values>)"
        )

    def __str__(self):
        shown = self.elbo if len(self.elbo) <= 2 else [self.elbo[0], self.elbo[-1]]
        trace = (", ..., " if len(self.elbo) > 2 else ", ").join(f"{v:.6g}" for v in shown)
        return "\n".join(
            [
                f"         message: {self.message}",
                f"       converged: {self.converged}",
                f" num_evaluations: {self.num_evaluations}",
                f"      final_elbo: {self.final_elbo:.6g} ± {self.final_elbo_se:.2g} (MC SE)",
                f"            elbo: [{trace}]  ({len(self.elbo)} values)",
            ]
        )


def elbo_converged(elbo: Sequence[float], window: int = 50, tol: float = 0.01) -> bool:
    """Whether the ELBO has stopped changing, allowing for Monte-Carlo noise.

    Compares the mean of the last ``window`` values with the mean of the
    ``window`` values before them. The change ``d`` counts as no change when
    ``|d| < max(tol, 2 * se)``, where ``se = sqrt(2 σ² / window)`` is the
    standard error of ``d`` for steps with noise variance ``σ²``. ``σ²`` is
    estimated from successive differences over both windows (von Neumann:
    ``mean((e_t − e_{t−1})²) / 2``), which a trend barely inflates -- the
    windows' own variances would count a still-rising ELBO as noise and stop
    it early. A significant *decrease* is not convergence (the fit is
    diverging or oscillating), so it does not stop the fit either.

    :param elbo: sequence of ELBO values, one per step.
    :param int window: window length (at least 2).
    :param float tol: the smallest change, in nats per window, that counts
        as progress however precisely it is estimated.
    :returns: ``False`` while fewer than ``2 * window`` values are available.

    Usage::

        import random
        from curvi.fit import elbo_converged

        rng = random.Random(0)
        flat = [rng.gauss(0.0, 1.0) for _ in range(100)]
        rising = [0.2 * i + v for i, v in enumerate(flat)]
        assert elbo_converged(flat, window=50)
        assert not elbo_converged(rising, window=50)
        # a fast rise early in the first window is progress, not noise
        climb = [-60.0 * 0.9**i + v for i, v in enumerate(flat)]
        assert not elbo_converged(climb, window=50)
    """
    if len(elbo) < 2 * window:
        return False
    recent = elbo[-2 * window :]
    change = statistics.fmean(recent[window:]) - statistics.fmean(recent[:window])
    steps = [b - a for a, b in zip(recent, recent[1:])]
    noise_var = statistics.fmean(d * d for d in steps) / 2
    se = math.sqrt(2 * noise_var / window)
    return abs(change) < max(tol, 2.0 * se)


def fit(
    model: Callable,
    guide: Callable,
    *args,
    steps: int = 2000,
    optim: pyro.optim.PyroOptim | None = None,
    loss: pyro.infer.ELBO | Callable | None = None,
    window: int = 50,
    tol: float | None = 0.01,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model`` with :class:`pyro.infer.SVI`.

    Takes at most ``steps`` SVI steps (loss-and-gradient evaluations) in
    total, passing ``*args, **kwargs`` to the model and guide. A progress
    bar shows the ELBO averaged over the last ``window`` steps.

    **Defaults: what the guide prefers.** With no ``optim``, a guide that
    has a method ``default_optim(*args, **kwargs)`` is fitted with the
    optimiser it returns (:class:`~curvi.guides.AmortizedLaplaceGuide`:
    sample-average Newton, :class:`~curvi.laplace_newton.LaplaceNewton`);
    other guides with ``pyro.optim.Adam({"lr": 0.01})``. With no ``loss``,
    an optimiser that has an attribute ``loss`` (curvi's curvature
    optimisers) is used with that loss, else the guide's
    ``default_loss(*args, **kwargs)`` if it has one and it is not None
    (a Laplace guide that sums hidden discrete sites out: Pyro's
    ``TraceEnum_ELBO`` summing them out of the model), others with
    :class:`~pyro.infer.Trace_ELBO`.

    **Checks.** A guide with a method ``check_fit(*args, **kwargs)`` is
    asked after the fit whether to distrust it; what it says (e.g. the
    amortized guide's estimate of Laplace's bias over the units) is warned
    and appended to the message.

    **Stopping.** An optimiser with an attribute ``outcome`` decides when it
    is done (``outcome`` turns from ``None`` into a :class:`FitOutcome`) and
    reports the final ELBO with its Monte Carlo standard error. Otherwise,
    every ``window`` steps (counted from the start of the fit, across
    resumes) :func:`elbo_converged` compares the last two windows of the
    ELBO trace and the fit stops once it sees no significant change -- as
    *converged* only if that window is not clearly below the best window so
    far (else ``converged=False`` and the message says so). A windowed mean
    that falls below the best by more than ten times its magnitude (plus 10
    nats) stops the fit as *diverged*, with a :class:`RuntimeWarning`.

    A non-finite loss raises :class:`ValueError` naming the step; it is
    caught before the optimiser acts, so the parameters stay at the last
    good step (and a checkpoint of that step is written first when
    ``checkpoint`` is given).

    **Checkpoints.** With ``checkpoint`` set, one file (written atomically:
    a temporary file in the same directory, then :func:`os.replace`) is saved
    every ``checkpoint_every`` steps, when the fit ends, when a non-finite
    loss stops it, and on :class:`KeyboardInterrupt` (which is then
    re-raised). An interrupt inside a step's model/guide/gradient evaluation
    first undoes that step (random state, module buffers, gradients) and
    saves the last completed step; the rare interrupt inside the optimiser
    update leaves the previous checkpoint in place. With ``resume=True`` and
    an existing file, the fit restores that state and continues, so an
    interrupted and resumed fit gives bitwise the same ELBO trace and
    parameters as an uninterrupted one. To do so it first evaluates the loss
    once under :func:`pyro.poutine.block` (discarding the value), which sets
    up lazily built guides such as :class:`~pyro.infer.autoguide.AutoNormal`
    and tells which parameters the fit uses; every one of them must be in
    the checkpoint with the same shape, and a model or guide that is a
    :class:`torch.nn.Module` must have exactly the saved ``state_dict``
    keys and shapes, or a :class:`ValueError` is raised before anything is
    loaded. Checkpoints are pickles (``torch.load(weights_only=False)``):
    only resume from files you trust.

    Usage::

        import torch, pyro, pyro.distributions as dist
        from pyro.infer.autoguide import AutoNormal
        from curvi.fit import fit

        def model(x):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("data", len(x)):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        x = torch.randn(50) + 3.0
        guide = AutoNormal(model)
        result = fit(model, guide, x, steps=3000,
                     optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
        print(result)
        exact = x.sum() / (len(x) + 1 / 100)  # conjugate posterior mean
        assert abs(guide.median()["mu"] - exact) < 0.05

    :param callable model: a Pyro model.
    :param callable guide: a Pyro guide for ``model``.
    :param args: positional arguments for the model and guide.
    :param int steps: the most SVI steps to take, counting steps taken before
        a resume (at least 1).
    :param ~pyro.optim.PyroOptim optim: the optimiser (default: see above).
    :param loss: an :class:`~pyro.infer.elbo.ELBO` or a loss callable as
        accepted by :class:`~pyro.infer.SVI` (default: see above; the
        default of the amortized guide draws vectorized particles, so the
        model must broadcast over a particle plate, e.g. index
        ``beta[..., 0]``). A loss that returns a tuple is recorded by its
        first element.
    :param int window: the steps per convergence window and the smoothing
        span of the progress bar (at least 2).
    :param tol: the smallest change of the windowed mean ELBO, in nats per
        window, that counts as progress; ``None`` never stops early. The
        default 0.01 nats is absolute because ELBOs are log-probabilities: a
        change of 0.01 moves the evidence bound by 1% whatever the size of
        the data, whereas a relative tolerance would stop fits to large data
        sets with many nats still to gain. Monte-Carlo noise is handled by
        the ``2 * se`` term of :func:`elbo_converged`, not by ``tol``.
    :param checkpoint: path of the checkpoint file, or ``None``.
    :param int checkpoint_every: steps between periodic checkpoints (at least 1).
    :param bool resume: continue from ``checkpoint`` if the file exists;
        otherwise (``False``) start afresh and overwrite it.
    :param bool progress: show a :mod:`tqdm` progress bar.
    :param callback: ``callback(step, elbo)`` is called after every step with
        the total step count and that step's ELBO; a true return value stops
        the fit.
    :param kwargs: keyword arguments for the model and guide.
    :returns: a :class:`FitResult`.
    :raises TypeError: for an option of the wrong type.
    :raises ValueError: for an option out of range, a non-finite loss, or a
        checkpoint that cannot be read or does not match the model and guide.
    """
    _check_options(model, guide, steps, optim, window, tol, checkpoint, checkpoint_every, callback)
    optim, loss, from_guide = _defaults(guide, optim, loss, args, kwargs)
    if distributed.is_sharded() and not getattr(optim, "shares_units", False):
        raise ValueError(
            f"under torch.distributed (units shared among {distributed.world_size()} processes) "
            f"curvi.fit needs an optimiser that sums its evaluations over the processes: "
            f"LaplaceNewton (AmortizedLaplaceGuide's default), not {type(optim).__name__}"
        )
    svi = SVI(model, guide, optim, loss)
    modules = _modules(model, guide)
    stepper = _Stepper(svi, modules, keep=checkpoint is not None)
    decides = hasattr(optim, "outcome")  # the optimiser stops the fit itself

    elbo, resumed = [], ""
    # processes sharing the units resume from rank 0's file (they may not see it)
    exists = checkpoint is not None and resume and os.path.exists(checkpoint)
    if distributed.broadcast_object(exists, "whether to resume"):
        elbo = _resume(checkpoint, steps, svi, modules, args, kwargs)
        resumed = f" (resumed from {os.fspath(checkpoint)} at step {len(elbo)})"

    def save():
        if checkpoint is not None and elbo:
            state = _capture(len(elbo), elbo, optim, modules)
            if distributed.rank() == 0:  # one file, as one process writes it
                _write_checkpoint(checkpoint, state)
            distributed.barrier("waiting for rank 0 to write the checkpoint")

    watch = _Watch(window, tol if not decides else None, elbo)
    reason = _stop_reason(optim, watch, elbo, decides)
    # an optimiser that decides when it is done has no known total
    bar = tqdm(
        total=None if decides else steps,
        initial=len(elbo),
        disable=not progress or distributed.rank() > 0,  # one bar for all processes
        desc="fit",
        unit="step",
    )
    first_call = True
    try:
        while reason is None and len(elbo) < steps:
            try:
                value = stepper(*args, **kwargs)
            except (RuntimeError, ValueError) as error:
                # the hint only where it may be the cause (the first step of the
                # guide's own optimiser) and only for the plain types, which
                # take a message; anything else propagates untouched
                if from_guide and first_call and type(error) in (RuntimeError, ValueError):
                    raise type(error)(
                        f"{error}\n(curvi.fit used the optimiser {type(optim).__name__} that "
                        f"{type(guide).__name__} prefers; its loss draws "
                        f"{getattr(loss, 'num_particles', 1)} vectorized particles: a model must "
                        "broadcast over a particle plate -- index beta[..., 0], not beta[0] -- "
                        "or pass optim= and loss= yourself)"
                    ) from error
                raise
            first_call = False
            elbo.append(value)
            if progress:
                bar.set_postfix(elbo=f"{statistics.fmean(elbo[-window:]):.6g}", refresh=False)
                bar.update(1)
            # processes sharing the units stop together when a callback asks any of them to
            if distributed.any_rank(
                callback is not None and bool(callback(len(elbo), value)), "the callback"
            ):
                reason = "callback"
            else:
                reason = _stop_reason(optim, watch, elbo, decides)
            if reason is None and len(elbo) < steps and len(elbo) % checkpoint_every == 0:
                save()
    except _NonFiniteLoss as error:
        save()
        raise ValueError(f"non-finite loss {error.value} at step {len(elbo) + 1}") from None
    except KeyboardInterrupt:
        if stepper.consistent:
            save()
        raise
    finally:
        bar.close()
    save()
    result = _result(elbo, reason, steps, window, resumed, optim if decides else None, watch)
    if reason == "diverged":
        warnings.warn(f"curvi.fit: {result.message}", RuntimeWarning, stacklevel=2)
    note = guide.check_fit(*args, **kwargs) if hasattr(guide, "check_fit") and reason != "diverged" else None
    if note:
        warnings.warn(f"curvi.fit: {note}", UserWarning, stacklevel=2)
        result = result._replace(message=f"{result.message}; {note}")
    return result


# ---------------------------------------------------------------------------
# options, stopping and result


def _defaults(guide, optim, loss, args, kwargs):
    """The optimiser the guide prefers (``guide.default_optim(*args,
    **kwargs)``), else Adam; the optimiser's own loss (``optim.loss``), else
    Trace_ELBO. Also returns whether the optimiser came from the guide."""
    from_guide = False
    if optim is None and hasattr(guide, "default_optim"):
        optim = guide.default_optim(*args, **kwargs)
        from_guide = True
    optim = pyro.optim.Adam({"lr": 0.01}) if optim is None else optim
    if loss is None:
        loss = getattr(optim, "loss", None)
    if loss is None and hasattr(guide, "default_loss"):
        loss = guide.default_loss(*args, **kwargs)
    return optim, Trace_ELBO() if loss is None else loss, from_guide


def _check_options(model, guide, steps, optim, window, tol, checkpoint, every, callback):
    if not callable(model):
        raise TypeError(f"model must be callable, got {model!r}")
    if not callable(guide):
        raise TypeError(f"guide must be callable, got {guide!r}")
    check_count("steps", steps, 1)
    check_count("window", window, 2)
    check_count("checkpoint_every", every, 1)
    if optim is not None and not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(f"optim must be a pyro.optim.PyroOptim, got {optim!r}")
    if tol is not None:
        check_positive("tol", tol, allow_zero=True)
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path or None, got {checkpoint!r}")
        directory = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint directory {directory!r} does not exist")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")


class _Watch:
    """The stopping rule of a noisy ELBO trace, one window at a time: no
    significant change (:func:`elbo_converged`) is convergence, unless the
    trace has settled below its best window; a fall by an order of
    magnitude is divergence."""

    def __init__(self, window, tol, history=()):
        self.window, self.tol = window, tol
        self.fell = None  # (best, now) when the last window sits clearly below the best
        # the best window so far, a resumed fit's earlier windows included
        means = [statistics.fmean(history[i - window : i]) for i in range(window, len(history) + 1, window)]
        self.best = max(means, default=-math.inf)

    def __call__(self, elbo):
        if not elbo or len(elbo) % self.window:
            return None
        now = statistics.fmean(elbo[-self.window :])
        if now > self.best:
            self.best = now
        if self.best - now > 10.0 * (abs(self.best) + 10.0):
            self.fell = (self.best, now)
            return "diverged"
        if self.tol is None or not elbo_converged(elbo, self.window, self.tol):
            return None
        if self.best - now > max(1.0, 4.0 * _window_se(elbo, self.window)):
            self.fell = (self.best, now)
            return "fell"
        return "converged"


def _window_se(elbo, window):
    """Standard error of the mean of the last window, from successive differences."""
    recent = elbo[-window:]
    if len(recent) < 2:
        return math.nan
    noise_var = statistics.fmean((b - a) ** 2 for a, b in zip(recent, recent[1:])) / 2
    return math.sqrt(noise_var / len(recent))


def _stop_reason(optim, watch, elbo, decides):
    if decides:
        return None if optim.outcome is None else "optimiser"
    return watch(elbo)


def _result(elbo, reason, steps, window, resumed, optim, watch):
    n = len(elbo)
    converged = reason == "converged"
    final = statistics.fmean(elbo[-window:]) if elbo else math.nan
    final_se, info = _window_se(elbo, window), {}
    if reason == "optimiser":
        outcome = optim.outcome
        converged, message = outcome.converged, outcome.message
        final, final_se, info = outcome.elbo, outcome.elbo_se, dict(outcome.info)
    elif reason == "converged":
        message = f"converged after {n} evaluations"
    elif reason == "diverged":
        best, now = watch.fell
        message = f"diverged: the windowed mean ELBO fell from {best:.6g} to {now:.6g} after {n} evaluations"
    elif reason == "fell":
        best, now = watch.fell
        message = (
            f"not converged: the ELBO stopped changing at {now:.6g}, below its best "
            f"windowed mean {best:.6g} (after {n} evaluations)"
        )
    elif reason == "callback":
        message = f"stopped by callback after {n} evaluations"
    else:
        message = f"reached steps={steps}"
        if optim is not None:
            message += f" before {type(optim).__name__} finished"
    return FitResult(elbo, converged, n, message + resumed, final, final_se, info)


# ---------------------------------------------------------------------------
# one step, undone if the loss fails


class _NonFiniteLoss(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


class _Stepper:
    """``svi.step`` that checks the loss before the optimiser acts.

    If the model, guide or gradient evaluation raises (including a
    non-finite loss or a :class:`KeyboardInterrupt`), the parameters and
    optimiser are still those of the last step; gradients are zeroed and,
    with ``keep=True``, the random state and module buffers are put back, so
    the state is again exactly that after the last completed step.
    ``consistent`` says whether that holds now.
    """

    def __init__(self, svi, modules, keep):
        self.svi = svi
        self.modules = modules
        self.keep = keep
        self.consistent = True
        self.updating = False
        inner = svi.loss_and_grads

        def checked(*args, **kwargs):
            value = inner(*args, **kwargs)
            first = value[0] if isinstance(value, tuple) else value
            if not math.isfinite(torch_item(first)):
                raise _NonFiniteLoss(torch_item(first))
            self.updating = True
            return value

        svi.loss_and_grads = checked

    def __call__(self, *args, **kwargs):
        before = _volatile_state(self.modules) if self.keep else None
        self.consistent, self.updating = False, False
        try:
            value = self.svi.step(*args, **kwargs)
        except BaseException:
            if not self.updating:
                _zero_all_grads(self.modules)
                if before is not None:
                    _set_volatile_state(self.modules, before)
                self.consistent = True
            raise
        self.consistent = True
        return -(value[0] if isinstance(value, tuple) else value)


def _volatile_state(modules):
    """What a failed loss evaluation may have changed: RNG and buffers."""
    buffers = {
        role: {name: b.detach().clone() for name, b in module.named_buffers()}
        for role, module in modules.items()
    }
    return rng_state(), buffers


def _set_volatile_state(modules, state):
    rng, buffers = state
    set_rng_state(rng)
    for role, module in modules.items():
        for name, value in buffers[role].items():
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, value)


def _zero_all_grads(modules):
    zero_grads(p for _, p in pyro.get_param_store().named_parameters())
    for module in modules.values():
        zero_grads(module.parameters())


def _modules(model, guide):
    return {
        role: obj for role, obj in (("model", model), ("guide", guide)) if isinstance(obj, torch.nn.Module)
    }


# ---------------------------------------------------------------------------
# checkpoints


def _capture(step, elbo, optim, modules):
    return {
        "format": _FORMAT,
        "step": step,
        "elbo": list(elbo),
        "param_store": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        "modules": {role: _full_state_dict(module) for role, module in modules.items()},
        "rng": rng_state(),
    }


def _full_state_dict(module):
    """The module's state dict; its per-unit buffers (``module.unit_buffers``)
    over every unit, gathered from the processes that share them."""
    state = module.state_dict()
    for name in getattr(module, "unit_buffers", ()):
        if name in state:
            state[name] = distributed.gather_units(state[name], what=f"buffer {name!r}")
    return state


def _local_state_dict(module, saved):
    """A saved state dict with the per-unit buffers cut to this process's units."""
    if saved is None or not distributed.is_sharded():
        return saved
    saved = dict(saved)
    for name in getattr(module, "unit_buffers", ()):
        if name in saved:
            saved[name] = distributed.local_rows(saved[name])
    return saved


def _write_checkpoint(path, state):
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_checkpoint(path):
    try:
        state = torch.load(path, weights_only=False)
    except Exception as error:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} could not be read: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != _FORMAT or set(_KEYS) - set(state):
        raise ValueError(f"checkpoint {os.fspath(path)!r} is not a curvi.fit checkpoint")
    return state


def _resume(path, steps, svi, modules, args, kwargs):
    """Restore the checkpoint at ``path``; the ELBO trace so far."""
    state = _read_checkpoint(path) if distributed.rank() == 0 else None
    state = distributed.broadcast_object(state, "the checkpoint")
    if state["step"] > steps:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} already holds {state['step']} steps, "
            f"more than steps={steps}; pass steps >= {state['step']} or resume=False"
        )
    _restore(state, svi, modules, args, kwargs, path)
    return list(state["elbo"])


def _restore(state, svi, modules, args, kwargs, path):
    """Load a checkpoint into the live model, guide, param store and optimiser."""
    used = _used_params(svi, args, kwargs)
    problems = _param_problems(used, state["param_store"]["params"])
    saved = {role: _local_state_dict(module, state["modules"].get(role)) for role, module in modules.items()}
    for role, module in modules.items():
        problems += _state_dict_problems(role, module, saved[role])
    if problems:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not match this model and guide "
            "(nothing was loaded):\n  " + "\n  ".join(problems)
        )
    for role, module in modules.items():
        module.load_state_dict(saved[role])
    _load_param_store(state["param_store"])
    _zero_all_grads(modules)
    svi.optim.optim_objs.clear()  # forget torch optimisers of any earlier run
    svi.optim.grad_clip.clear()
    svi.optim.set_state(state["optim"])
    set_rng_state(state["rng"])


def _used_params(svi, args, kwargs):
    """Set up lazy guides (one blocked loss evaluation); the params it uses."""
    with poutine.block(), poutine.trace(param_only=True) as capture, distributed.evaluating_shares():
        svi.guide(*args, **kwargs)
        svi.loss(svi.model, svi.guide, *args, **kwargs)
    store = dict(pyro.get_param_store().named_parameters())
    return {name: store[name] for name in capture.trace.nodes if name in store}


def _param_problems(used, saved):
    problems = []
    for name, live in used.items():
        if name not in saved:
            problems.append(f"parameter {name!r} is not in the checkpoint")
        elif saved[name].shape != live.shape:
            problems.append(
                f"parameter {name!r} has shape {tuple(live.shape)}, the checkpoint {tuple(saved[name].shape)}"
            )
    return problems


def _state_dict_problems(role, module, saved):
    if saved is None:
        return [f"the {role} is a torch.nn.Module but the checkpoint has no state for it"]
    live = module.state_dict()
    problems = [f"{role} state {k!r} is not in the checkpoint" for k in live if k not in saved]
    problems += [f"{role} state {k!r} in the checkpoint is not in the {role}" for k in saved if k not in live]
    for k in live.keys() & saved.keys():
        if live[k].shape != saved[k].shape:
            problems.append(
                f"{role} state {k!r} has shape {tuple(live[k].shape)}, the checkpoint {tuple(saved[k].shape)}"
            )
    return problems


def _load_param_store(saved):
    """Copy saved values into live parameters (keeping every alias valid); add the rest."""
    store = pyro.get_param_store()
    live = dict(store.named_parameters())
    added = {"params": {}, "constraints": {}}
    with torch.no_grad():
        for name, value in saved["params"].items():
            if name in live and live[name].shape == value.shape:
                live[name].copy_(value)
                continue
            if name in store:
                del store[name]
            added["params"][name] = value
            added["constraints"][name] = saved["constraints"][name]
    store.set_state(added)

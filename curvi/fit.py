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
    assert resumed.elbo[:30] == first.elbo and resumed.steps == 60
    print(resumed.message)  # reached steps=60 (resumed from ... at step 30)
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
import tempfile
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

import pyro
import pyro.optim
import pyro.poutine as poutine
import pyro.util
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import torch_item, zero_grads

__all__ = ["FitResult", "elbo_converged", "fit"]

_FORMAT = "curvi.fit checkpoint 1"
_KEYS = ("format", "step", "elbo", "param_store", "optim", "modules", "rng")


class FitResult(NamedTuple):
    """What :func:`fit` did.

    :ivar list elbo: the ELBO estimate (``-loss``) of every step, including
        steps taken before a resume; ``len(elbo) == steps``.
    :ivar bool converged: whether :func:`elbo_converged` stopped the fit.
    :ivar int steps: the total number of steps taken.
    :ivar str message: why the fit stopped, e.g. ``"converged after 350
        steps"``, ``"reached steps=2000"``, ``"stopped by callback after 12
        steps"``, followed by ``" (resumed from PATH at step K)"`` when the
        fit was resumed from a checkpoint.
    :ivar float final_elbo: the mean ELBO of the last ``window`` steps.
    """

    elbo: list
    converged: bool
    steps: int
    message: str
    final_elbo: float

    def __repr__(self):
        return (
            f"FitResult(converged={self.converged}, steps={self.steps}, "
            f"final_elbo={self.final_elbo:.6g}, message={self.message!r}, "
            f"elbo=<{len(self.elbo)} values>)"
        )

    def __str__(self):
        shown = self.elbo if len(self.elbo) <= 2 else [self.elbo[0], self.elbo[-1]]
        trace = (", ..., " if len(self.elbo) > 2 else ", ").join(f"{v:.6g}" for v in shown)
        return "\n".join(
            [
                f"     message: {self.message}",
                f"   converged: {self.converged}",
                f"       steps: {self.steps}",
                f"  final_elbo: {self.final_elbo:.6g}  (mean of the last window)",
                f"        elbo: [{trace}]  ({len(self.elbo)} values)",
            ]
        )


def elbo_converged(elbo, window: int = 50, tol: float = 0.01) -> bool:
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
    loss=None,
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

    Takes at most ``steps`` SVI steps in total, passing ``*args, **kwargs``
    to the model and guide. Every ``window`` steps (counted from the start of
    the fit, across resumes) :func:`elbo_converged` compares the last two
    windows of the ELBO trace and the fit stops once it sees no significant
    change. A progress bar shows the ELBO averaged over the last ``window``
    steps.

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
    :param ~pyro.optim.PyroOptim optim: the optimiser; defaults to
        ``pyro.optim.Adam({"lr": 0.01})``, and for an
        :class:`~curvi.guides.AmortizedLaplaceGuide` to damped Newton steps
        on θ̂, :class:`curvi.laplace_newton.LaplaceNewton` ``(guide, decay=0.5)``
        (for the fastest fit of that guide see :func:`curvi.laplace_newton.fit_newton`).
    :param loss: an :class:`~pyro.infer.elbo.ELBO` or a loss callable as
        accepted by :class:`~pyro.infer.SVI`; defaults to
        :class:`~pyro.infer.Trace_ELBO`, with 8 vectorized particles when
        the default optimiser is ``LaplaceNewton`` (the model must then
        broadcast over a particle plate, e.g. index ``beta[..., 0]``). A loss that returns a tuple is
        recorded by its first element.
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
    :raises ValueError: for invalid options, a non-finite loss, or a
        checkpoint that cannot be read or does not match the model and guide.
    """
    optim, loss, default_particles = _defaults(guide, optim, loss)
    _check_options(model, guide, steps, optim, window, tol, checkpoint, checkpoint_every, callback)
    svi = SVI(model, guide, optim, loss)
    modules = _modules(model, guide)
    stepper = _Stepper(svi, modules, keep=checkpoint is not None)

    elbo, resumed = [], ""
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        elbo = _resume(checkpoint, steps, svi, modules, args, kwargs)
        resumed = f" (resumed from {os.fspath(checkpoint)} at step {len(elbo)})"

    def save():
        if checkpoint is not None and elbo:
            _write_checkpoint(checkpoint, _capture(len(elbo), elbo, optim, modules))

    reason = "converged" if _converged(elbo, window, tol) else None
    bar = tqdm(total=steps, initial=len(elbo), disable=not progress, desc="fit", unit="step")
    stepper_calls = 0
    try:
        while reason is None and len(elbo) < steps:
            try:
                value = stepper(*args, **kwargs)
            except (RuntimeError, ValueError) as error:
                if default_particles and stepper_calls == 0:
                    raise ValueError(
                        "the default loss for AmortizedLaplaceGuide draws 8 vectorized particles, and "
                        f"this step failed under them ({type(error).__name__}: {error}); if the model "
                        "does not broadcast over a particle plate (index beta[..., 0], not beta[0]), "
                        "pass loss=Trace_ELBO() or fix its indexing"
                    ) from error
                raise
            stepper_calls += 1
            elbo.append(value)
            if progress:
                bar.set_postfix(elbo=f"{statistics.fmean(elbo[-window:]):.6g}", refresh=False)
                bar.update(1)
            if callback is not None and callback(len(elbo), value):
                reason = "callback"
            elif _converged(elbo, window, tol):
                reason = "converged"
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
    return _result(elbo, reason, steps, window, resumed)


# ---------------------------------------------------------------------------
# options and result


def _defaults(guide, optim, loss):
    """Adam and Trace_ELBO; for an AmortizedLaplaceGuide, damped Newton steps
    (LaplaceNewton, step decay 0.5) on 8 vectorized particles. Also returns
    whether those default particles are in use."""
    from .guides import AmortizedLaplaceGuide
    from .laplace_newton import LaplaceNewton

    default_particles = False
    if isinstance(guide, AmortizedLaplaceGuide) and optim is None:
        optim = LaplaceNewton(guide, decay=0.5)
        if loss is None:
            loss = Trace_ELBO(num_particles=8, vectorize_particles=True)
            default_particles = True
    optim = pyro.optim.Adam({"lr": 0.01}) if optim is None else optim
    loss = Trace_ELBO() if loss is None else loss
    return optim, loss, default_particles


def _check_options(model, guide, steps, optim, window, tol, checkpoint, every, callback):
    if not callable(model):
        raise ValueError(f"model must be callable, got {model!r}")
    if not callable(guide):
        raise ValueError(f"guide must be callable, got {guide!r}")
    _check_count("steps", steps, 1)
    _check_count("window", window, 2)
    _check_count("checkpoint_every", every, 1)
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise ValueError(f"optim must be a pyro.optim.PyroOptim, got {optim!r}")
    if tol is not None and not (isinstance(tol, numbers.Real) and 0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0 or None, got {tol!r}")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise ValueError(f"checkpoint must be a file path or None, got {checkpoint!r}")
        directory = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint directory {directory!r} does not exist")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {callback!r}")


def _check_count(name, value, least):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _converged(elbo, window, tol):
    if tol is None or not elbo or len(elbo) % window:
        return False
    return elbo_converged(elbo, window, tol)


def _result(elbo, reason, steps, window, resumed):
    n = len(elbo)
    if reason == "converged":
        message = f"converged after {n} steps"
    elif reason == "callback":
        message = f"stopped by callback after {n} steps"
    else:
        message = f"reached steps={steps}"
    final = statistics.fmean(elbo[-window:]) if elbo else math.nan
    return FitResult(elbo, reason == "converged", n, message + resumed, final)


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
    return _rng_state(), buffers


def _set_volatile_state(modules, state):
    rng, buffers = state
    _set_rng_state(rng)
    for role, module in modules.items():
        for name, value in buffers[role].items():
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, value)


def _rng_state():
    """Python, NumPy and torch random states (and CUDA's, when in use)."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    pyro.util.set_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _zero_all_grads(modules):
    zero_grads(p for _, p in pyro.get_param_store().named_parameters())
    for module in modules.values():
        zero_grads(module.parameters())


def _modules(model, guide):
    return {
        role: obj
        for role, obj in (("model", model), ("guide", guide))
        if isinstance(obj, torch.nn.Module)
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
        "modules": {role: module.state_dict() for role, module in modules.items()},
        "rng": _rng_state(),
    }


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
    state = _read_checkpoint(path)
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
    for role, module in modules.items():
        problems += _state_dict_problems(role, module, state["modules"].get(role))
    if problems:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not match this model and guide "
            "(nothing was loaded):\n  " + "\n  ".join(problems)
        )
    for role, module in modules.items():
        module.load_state_dict(state["modules"][role])
    _load_param_store(state["param_store"])
    _zero_all_grads(modules)
    svi.optim.optim_objs.clear()  # forget torch optimisers of any earlier run
    svi.optim.grad_clip.clear()
    svi.optim.set_state(state["optim"])
    _set_rng_state(state["rng"])


def _used_params(svi, args, kwargs):
    """Set up lazy guides (one blocked loss evaluation); the params it uses."""
    with poutine.block(), poutine.trace(param_only=True) as capture:
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
                f"parameter {name!r} has shape {tuple(live.shape)}, "
                f"the checkpoint {tuple(saved[name].shape)}"
            )
    return problems


def _state_dict_problems(role, module, saved):
    if saved is None:
        return [f"the {role} is a torch.nn.Module but the checkpoint has no state for it"]
    live = module.state_dict()
    problems = [f"{role} state {k!r} is not in the checkpoint" for k in live if k not in saved]
    problems += [
        f"{role} state {k!r} in the checkpoint is not in the {role}" for k in saved if k not in live
    ]
    for k in live.keys() & saved.keys():
        if live[k].shape != saved[k].shape:
            problems.append(
                f"{role} state {k!r} has shape {tuple(live[k].shape)}, "
                f"the checkpoint {tuple(saved[k].shape)}"
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

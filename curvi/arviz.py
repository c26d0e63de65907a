"""Any fit's draws as an ArviZ ``InferenceData``.

:func:`to_inference_data` takes a Pyro model, its arguments and posterior
draws by site -- from ``pyro.infer.MCMC``, ``Predictive`` on a guide,
:meth:`curvi.LaplaceMarginal.sample_locals` (with the globals' draws) or a
Laplace guide's ``laplace_posterior(...).sample(S)`` -- and builds the
groups ArviZ's diagnostics and model comparison read: ``az.summary``,
``az.plot_*``, ``az.loo``, ``az.waic``, ``az.compare``.

The model is replayed with the draws: once for all draws in an outer
``pyro.plate`` (as ``Predictive(parallel=True)`` vectorises), checked
against one-draw-at-a-time replays at a few draws, and draw by draw (as
``Predictive``'s default loop) when the model does not broadcast over the
extra plate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checks import check_count

__all__ = ["to_inference_data"]

_DRAW_PLATE = "_curvi_draws"
_CHUNK_ELEMENTS = 2**24  # values per vectorised replay (memory bound)


def to_inference_data(
    model: Callable,
    draws: Mapping[str, torch.Tensor],
    *args,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    observed: Sequence[str] | None = None,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    num_chains: int = 1,
    **kwargs,
):
    """The draws of a fit of ``model`` as an ``arviz.InferenceData``.

    Usage::

        import arviz as az
        import pyro, pyro.distributions as dist
        from curvi import AmortizedLaplaceGuide

        def model(group, counts):                  # counts ~ 1 + (1 | group), Poisson
            mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = pyro.sample("tau", dist.HalfNormal(1.0))
            with pyro.plate("groups", 6):
                u = pyro.sample("u", dist.Normal(0.0, tau))
            with pyro.plate("obs", len(counts)):
                pyro.sample("y", dist.Poisson((mu + u[..., group]).exp()), obs=counts)

        group = torch.arange(6).repeat_interleave(5)
        counts = torch.poisson(torch.linspace(1.0, 6.0, 6)[group])
        guide = AmortizedLaplaceGuide(model, unit_plate="groups")    # (curvi.fit would train it)
        draws = guide.laplace_posterior(group, counts).sample(1000)   # mu, tau, u
        idata = to_inference_data(model, draws, group, counts,
                                  coords={"group": list("abcdef")}, dims={"u": ["group"]})
        az.summary(idata, var_names=["mu", "tau", "u"])   # u[a] ... u[f]
        az.loo(idata)                                    # PSIS-LOO over the 30 counts

    Groups of the result (each array ``(chain, draw, ...)`` but
    ``observed_data``):

    * ``posterior``: every site in ``draws``, constrained as given, and
      every deterministic site (``pyro.deterministic``) the draws lack,
      computed by the replay when the draws hold every latent site.
    * ``posterior_predictive``: one replicate of each observed site per
      draw, drawn from the site's distribution given the draw -- what
      ``Predictive`` draws from the model with its observations
      unconditioned (a replicate feeds the sites downstream of it).
    * ``log_likelihood``: each observed site's pointwise log density at
      its observed value, per draw: the site's ``log_prob`` (one term per
      element of its batch shape; an event -- ``.to_event``, a
      multivariate site -- is one term; put observations in a plate for
      one term each), with ``poutine.scale`` factors applied and masked
      elements 0 (``poutine.mask``, ``obs_mask``) as in Pyro's own
      ``log_prob``. ``az.loo`` and ``az.waic`` read it; with several
      observed sites pass their ``var_name``. A masked element's column is
      constant, for which PSIS reports ``k̂ = inf``.
    * ``observed_data``: each observed site's value.

    :param callable model: the Pyro model.
    :param dict draws: constrained draws by site name, each with a leading
        dimension S (the same for all), of the model's latent sites and
        optionally of its deterministic sites, at the shape the model gives
        the site (a unit latent in a plate at ``dim=-2`` keeps its trailing
        1). All latent sites are needed for the replayed groups.
    :param args: the model's arguments, the observed data among them (and
        ``kwargs``: its keyword arguments).
    :param dict coords: labels by dimension name, as ArviZ's ``from_dict``
        (a dimension's labels must match its size).
    :param dict dims: dimension names by site, for the dimensions after the
        draws' (an observed site's for its data's dimensions; its pointwise
        log-likelihood takes the leading ones). Sites without get ArviZ's
        ``<site>_dim_<i>``.
    :param observed: the observed sites to export (default: every observed
        site of the model but ``pyro.factor`` terms).
    :param bool posterior_predictive: add the ``posterior_predictive`` group.
    :param bool log_likelihood: add the ``log_likelihood`` group.
    :param int num_chains: C: the draws are C chains of S / C draws each,
        one after the other (``mcmc.get_samples()``'s order).
    :returns: ``arviz.InferenceData``. Draws and data may live on any
        device and in any dtype; the replay runs there, and only the arrays
        handed to ArviZ are copied to the CPU.
    :raises ValueError: naming the site, for draws that disagree on S, are
        not finite, have the wrong shape, or name no latent or deterministic
        site of the model; for latent sites the draws lack when the model is
        replayed; for ``dims`` of the wrong length and ``coords`` of the
        wrong size.
    """
    check_count("num_chains", num_chains, 1)
    draws, num = _check_draws(draws)
    if num % num_chains:
        raise ValueError(f"{num} draws do not divide into num_chains={num_chains} chains of equal length")
    with torch.no_grad():
        structure = _Structure(model, draws, args, kwargs)
        exported = structure.exported(observed)
        replay = bool(exported) and (posterior_predictive or log_likelihood)
        if replay and structure.missing:
            raise ValueError(
                f"the draws lack the model's latent site(s) {structure.missing}: the log-likelihood and "
                "posterior predictive replay the model with every latent fixed by a draw (or pass "
                "log_likelihood=False, posterior_predictive=False to export the draws alone)"
            )
        computed = [n for n in structure.deterministic if n not in draws] if not structure.missing else []
        shapes = {n: tuple(v.shape[1:]) for n, v in draws.items()}
        shapes.update({n: structure.shape[n] for n in computed})
        obs_shapes = {n: structure.obs_shape[n] for n in exported}
        ll_dims = _check_dims(dims, coords, shapes, obs_shapes, structure.log_lik_shape)
        wanted = _Wanted(
            log_lik=exported if log_likelihood else [],
            replicate=exported if posterior_predictive else [],
            deterministic=computed,
        )
        results = _replay(model, structure, draws, num, wanted, args, kwargs) if not wanted.empty else {}

    posterior = dict(draws)
    posterior.update({n: results[("deterministic", n)] for n in computed})

    az = _arviz()
    dims = dict(dims or {})
    groups = {"posterior": _dataset(az, posterior, num_chains, coords, dims)}
    if posterior_predictive and exported:
        replicates = {n: results[("replicate", n)] for n in exported}
        groups["posterior_predictive"] = _dataset(az, replicates, num_chains, coords, dims)
    if log_likelihood and exported:
        log_lik = {n: results[("log_lik", n)] for n in exported}
        groups["log_likelihood"] = _dataset(az, log_lik, num_chains, coords, ll_dims)
    if exported:
        values = {n: _numpy(structure.obs_value[n]) for n in exported}
        groups["observed_data"] = az.dict_to_dataset(
            values,
            library=pyro,
            coords=coords,
            dims={n: d for n, d in dims.items() if n in values},
            default_dims=[],
        )
    return az.InferenceData(**groups)


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.23 announces its refactor
        import arviz as az
    return az


def _numpy(x):
    return x.detach().cpu().numpy()


def _dataset(az, values, num_chains, coords, dims):
    data = {n: _numpy(v.reshape((num_chains, -1) + tuple(v.shape[1:]))) for n, v in values.items()}
    return az.dict_to_dataset(
        data, library=pyro, coords=coords, dims={n: d for n, d in dims.items() if n in data}
    )


def _check_draws(draws):
    if not isinstance(draws, Mapping) or not draws:
        raise ValueError(
            f"draws must be a non-empty dict of tensors by site name, got {type(draws).__name__}"
        )
    checked = {}
    for name, value in draws.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"draws['{name}'] must be a tensor, got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"draws['{name}'] is a scalar: draws need a leading dimension S (the draws)")
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"draws['{name}'] has {bad} entries that are NaN or infinite")
        checked[name] = value.detach()
    sizes = {name: value.shape[0] for name, value in checked.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the draws disagree on the number of draws S (leading dimension): {sizes}")
    num = next(iter(sizes.values()))
    if num < 1:
        raise ValueError("the draws hold no draws (S = 0)")
    return checked, num


class _SetLatents(Messenger):
    """Fixes the values of latent sites, which stay latent (``poutine.condition``
    would make them observed)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


class _Replicate(Messenger):
    """Replaces the value of the named observed sites by a draw from their
    distribution, broadcast to the observations' shape as ``log_prob``
    broadcasts it; the model goes on with the replicate."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def _pyro_sample(self, msg):
        if msg["name"] in self.names and msg["is_observed"]:
            fn, value = msg["fn"], msg["value"]
            event = len(fn.event_shape)
            shape = torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - event])
            if shape != fn.batch_shape:
                fn = fn.expand(shape)
            msg["value"] = fn.sample()


class _Structure:
    """The model's sites, read off one run with the first draw."""

    def __init__(self, model, draws, args, kwargs):
        first = {name: value[0] for name, value in draws.items()}
        trace = poutine.trace(_SetLatents(first)(model)).get_trace(*args, **kwargs)
        self.latent, self.deterministic, self.observed, self.factors = [], [], [], []
        self.shape, self.batch_shape, self.event_shape = {}, {}, {}
        self.obs_value, self.obs_shape, self.log_lik_shape = {}, {}, {}
        nesting = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size is not None and frame.size != frame.full_size:
                    raise ValueError(
                        f"plate '{frame.name}' subsamples ({frame.size} of {frame.full_size}): exporting "
                        "needs every observation (remove subsample_size)"
                    )
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
            fn = site["fn"]
            nesting = max(nesting, len(fn.batch_shape))
            if not site["is_observed"]:
                self.latent.append(name)
                self.shape[name] = tuple(fn.batch_shape + fn.event_shape)
                self.batch_shape[name], self.event_shape[name] = tuple(fn.batch_shape), tuple(fn.event_shape)
            elif site["infer"].get("_deterministic"):
                self.deterministic.append(name)
                self.shape[name] = tuple(site["value"].shape)
            elif isinstance(fn, dist.Unit):
                self.factors.append(name)
            else:
                self.observed.append(name)
                value = site["value"]
                self.obs_value[name], self.obs_shape[name] = value, tuple(value.shape)
                log_prob = fn.log_prob(value)
                self.log_lik_shape[name] = tuple(log_prob.shape)
                nesting = max(nesting, log_prob.dim())
        self.nesting = nesting
        for name, value in draws.items():
            if name in self.observed or name in self.factors:
                kind = "an observed site" if name in self.observed else "a pyro.factor term"
                raise ValueError(
                    f"draws['{name}']: '{name}' is {kind} of the model; draws hold its latent "
                    f"sites {self.latent} (and optionally deterministic sites {self.deterministic})"
                )
            if name not in self.shape:
                raise ValueError(
                    f"draws['{name}']: the model has no site '{name}'; its latent sites are {self.latent}"
                    + (f" and its deterministic sites {self.deterministic}" if self.deterministic else "")
                )
            if tuple(value.shape[1:]) != self.shape[name]:
                raise ValueError(
                    f"draws['{name}'] has shape {tuple(value.shape)}: the model's site '{name}' has shape "
                    f"{self.shape[name]}, so its draws need shape (S, *{self.shape[name]})"
                )
        self.missing = [name for name in self.latent if name not in draws]

    def exported(self, observed):
        if observed is None:
            return list(self.observed)
        if isinstance(observed, str):
            observed = [observed]
        names = list(observed)
        for name in names:
            if name not in self.observed:
                raise ValueError(
                    f"observed: '{name}' is not an observed site of the model; those are {self.observed}"
                )
        return names


class _Wanted:
    def __init__(self, log_lik, replicate, deterministic):
        self.log_lik, self.replicate, self.deterministic = list(log_lik), list(replicate), list(deterministic)
        self.empty = not (self.log_lik or self.replicate or self.deterministic)


def _replay(model, structure, draws, num, wanted, args, kwargs):
    """``{(kind, site): tensor (S, ...)}`` for kinds ``log_lik``, ``replicate``
    and ``deterministic``: vectorised over the draws when the model allows,
    else draw by draw."""
    latents = {name: draws[name] for name in structure.latent}
    try:
        results = _vectorised(model, structure, latents, num, wanted, args, kwargs)
    except Exception:  # the model does not broadcast over a plate of draws
        results = None
    if results is not None:
        for s in sorted({0, num // 2, num - 1}):
            one = _one_draw(model, structure, latents, s, wanted, args, kwargs, replicate=False)
            if not all(_close(results[key][s], value) for key, value in one.items()):
                results = None
                break
    if results is None:
        per_draw = [_one_draw(model, structure, latents, s, wanted, args, kwargs) for s in range(num)]
        results = {key: torch.stack([d[key] for d in per_draw]) for key in per_draw[0]}
    return results


def _close(a, b):
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() and b.is_floating_point()):
        return bool((a == b).all())
    tol = math.sqrt(torch.finfo(b.dtype).eps)
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], b[~finite]):
        return False
    scale = float(b[finite].abs().max()) if finite.any() else 0.0
    return bool(torch.allclose(a[finite], b[finite], rtol=tol, atol=tol * max(scale, 1.0)))


def _one_draw(model, structure, latents, s, wanted, args, kwargs, replicate=True):
    values = {name: value[s] for name, value in latents.items()}
    out = {}
    if wanted.log_lik or wanted.deterministic:
        trace = poutine.trace(_SetLatents(values)(model)).get_trace(*args, **kwargs)
        out.update(_read(trace, wanted, structure, None))
    if replicate and wanted.replicate:
        trace = poutine.trace(_Replicate(wanted.replicate)(_SetLatents(values)(model))).get_trace(
            *args, **kwargs
        )
        for name in wanted.replicate:
            value = trace.nodes[name]["value"]
            if tuple(value.shape) != structure.obs_shape[name]:
                raise ValueError(
                    f"site '{name}': its distribution draws shape {tuple(value.shape)} but it observes "
                    f"shape {structure.obs_shape[name]}; replicates need the two to agree (or pass "
                    "posterior_predictive=False)"
                )
            out[("replicate", name)] = value
    return out


def _read(trace, wanted, structure, num):
    """Pointwise log-likelihoods and deterministic values from one replay
    (``num``: the size of its plate of draws, ``None`` for one draw)."""
    wanted_ll = set(wanted.log_lik)
    trace.compute_log_prob(lambda name, site: name in wanted_ll)
    out = {}
    for name in wanted.log_lik:
        out[("log_lik", name)] = _align(
            trace.nodes[name]["log_prob"], num, structure.log_lik_shape[name], name
        )
    for name in wanted.deterministic:
        out[("deterministic", name)] = _align(trace.nodes[name]["value"], num, structure.shape[name], name)
    return out


def _align(value, num, shape, name):
    """``value`` as ``(num, *shape)`` (or ``shape`` for one draw), dropping
    the plates' singleton dimensions; an error when its sizes are others."""
    target = tuple(shape) if num is None else (num,) + tuple(shape)
    if tuple(value.shape) == target:
        return value
    if [d for d in value.shape if d != 1] != [d for d in target if d != 1]:
        raise ValueError(f"site '{name}': replay gave shape {tuple(value.shape)}, expected {target}")
    return value.reshape(target)


def _vectorised(model, structure, latents, num, wanted, args, kwargs):
    """All draws at once in an outer plate, in chunks that bound memory."""
    per_draw = sum(math.prod(structure.shape[n]) for n in latents)
    per_draw += sum(math.prod(structure.obs_shape[n]) for n in structure.observed)
    per_draw += sum(math.prod(structure.shape[n]) for n in wanted.deterministic)
    chunk = max(1, min(num, _CHUNK_ELEMENTS // max(per_draw, 1)))
    pieces = []
    for start in range(0, num, chunk):
        size = min(chunk, num - start)
        values = {}
        for name, value in latents.items():
            batch, event = structure.batch_shape[name], structure.event_shape[name]
            pad = (1,) * (structure.nesting - len(batch))
            values[name] = value[start : start + size].reshape((size,) + pad + batch + event)
        plate = pyro.plate(_DRAW_PLATE, size, dim=-structure.nesting - 1)
        out = {}
        if wanted.log_lik or wanted.deterministic:
            trace = poutine.trace(_SetLatents(values)(plate(model))).get_trace(*args, **kwargs)
            out.update(_read(trace, wanted, structure, size))
        if wanted.replicate:
            replicated = _Replicate(wanted.replicate)(_SetLatents(values)(plate(model)))
            trace = poutine.trace(replicated).get_trace(*args, **kwargs)
            for name in wanted.replicate:
                out[("replicate", name)] = _align(
                    trace.nodes[name]["value"], size, structure.obs_shape[name], name
                )
        pieces.append(out)
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def _check_dims(dims, coords, shapes, obs_shapes, log_lik_shapes):
    """Checks ``dims`` and ``coords`` against the sites' shapes; returns the
    log-likelihood's dims (the leading ones of each observed site's)."""
    dims = dict(dims or {})
    coords = dict(coords or {})
    for dim, labels in coords.items():
        try:
            len(labels)
        except TypeError:
            raise ValueError(
                f"coords['{dim}'] must be a sequence of labels, got {type(labels).__name__}"
            ) from None
    sizes = {}
    log_lik_dims = {}
    for name, names in dims.items():
        if isinstance(names, str):
            raise ValueError(f"dims['{name}'] must be a list of dimension names, got the string {names!r}")
        names = list(names)
        if name in shapes:
            shape, where = shapes[name], "its draws' dimensions after the draw"
        elif name in obs_shapes:
            shape, where = obs_shapes[name], "its observed value's dimensions"
        else:
            known = sorted(shapes) + sorted(obs_shapes)
            raise ValueError(
                f"dims names site '{name}', which is not exported; the exported sites are {known}"
            )
        if len(names) != len(shape):
            raise ValueError(
                f"dims['{name}'] = {names} names {len(names)} dimension(s), but site '{name}' has "
                f"{len(shape)} ({where}: shape {shape})"
            )
        for dim in names:
            if not isinstance(dim, str):
                raise ValueError(f"dims['{name}']: dimension names must be strings, got {dim!r}")
            if dim in ("chain", "draw"):
                raise ValueError(f"dims['{name}']: '{dim}' is ArviZ's own dimension; name it otherwise")
        if len(set(names)) != len(names):
            raise ValueError(f"dims['{name}'] = {names} repeats a dimension name")
        for dim, size in zip(names, shape):
            if dim in coords and len(coords[dim]) != size:
                raise ValueError(
                    f"site '{name}': dimension '{dim}' has size {size} but coords['{dim}'] has "
                    f"{len(coords[dim])} labels"
                )
            if dim in sizes and sizes[dim][1] != size:
                other, other_size = sizes[dim]
                raise ValueError(
                    f"site '{name}': dimension '{dim}' has size {size}, but {other_size} in site '{other}'"
                )
            sizes.setdefault(dim, (name, size))
        if name in obs_shapes and name in log_lik_shapes:
            ll_shape = log_lik_shapes[name]
            if tuple(obs_shapes[name][: len(ll_shape)]) == tuple(ll_shape):
                log_lik_dims[name] = names[: len(ll_shape)]
    return log_lik_dims

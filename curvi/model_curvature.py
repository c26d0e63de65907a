"""The model's curvature in its latent sites, H_z, as :class:`~curvi.compositional.CompositionalNG` uses it.

H_z = E_q[−∇²_z log p(x, z)] per unit (a datum of a VAE's data plate, a
group), or its generalised Gauss–Newton form: the likelihood's Fisher in its
natural parameters pulled back through η(z), plus the prior's curvature
(design.md §12). Three ways to get it:

* :func:`latent_curvature` -- the blocks ``(units, k, k)`` of a model at given
  latent values (Gauss–Newton or Hessian);
* :func:`unit_curvature_blocks` -- the same from a recorded model trace;
* :func:`pseudo_observation_scores` -- vectors v with E[v vᵀ] = the Fisher,
  without forming blocks: each site redrawn from its own distribution and
  its score taken (the cheap way for a large decoder).

The Gauss–Newton form knows the Fisher of Bernoulli, Categorical, Normal and
Poisson likelihoods; other families raise naming the site and pointing to
``curvature="hessian"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import Bernoulli, Categorical, Independent, Normal, Poisson

from .tensor_ops import symmetrize

__all__ = ["latent_curvature", "pseudo_observation_scores", "unit_curvature_blocks"]


def pseudo_observation_scores(trace, leaves: dict) -> dict[str, torch.Tensor]:
    """Vectors v with E[v vᵀ] = the model's Fisher in its latents, jointly
    over sites: every sample site's value is redrawn from its own
    distribution given the actual latents, x̃_s ~ p_s(· | parents), and
    v = ∇ Σ_s √c_s log p_s(x̃_s | parents) (c_s the site's scale), each
    latent differentiated both as a parent and as its own redrawn value.
    Scores of different sites are uncorrelated, and E[∇ log p ∇ log pᵀ] =
    E[−∇² log p] for each, so E[v vᵀ] is the likelihood's Fisher pulled back
    to z plus the priors' expected curvature (their Fisher in their
    parameters pulled back to the parents), the couplings between sites
    included. One backward pass per draw; no blocks."""
    total, own = 0.0, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn = site["fn"]
        with torch.no_grad():
            value = fn.sample()
        if name in leaves:
            value = value.detach().requires_grad_(True)
            own[name] = value
        scale = site["scale"] ** 0.5
        total = total + scale_and_mask(fn.log_prob(value), scale, site["mask"]).sum()
    names = list(leaves)
    inputs = [leaves[n] for n in names] + [own.get(n, leaves[n]) for n in names]
    grads = _grads(total, inputs, retain_graph=True)
    vectors = {}
    for i, name in enumerate(names):
        parts = [g for g in (grads[i], grads[len(names) + i] if name in own else None) if g is not None]
        vectors[name] = sum(parts) if parts else torch.zeros_like(leaves[name])
    return vectors


def latent_curvature(
    model: Callable, values: dict, *args, curvature: str = "ggn", **kwargs
) -> dict[str, torch.Tensor]:
    """The model's curvature H_z in its latent sites, one block per unit.

    Runs ``model(*args, **kwargs)`` with its latent sites set to ``values``
    and returns, for each site of ``values``, the blocks ``(units, k, k)``
    of H_z = Gauss–Newton (``curvature="ggn"``: the likelihood's Fisher
    pulled back to z plus the Hessian of −log prior) or the Hessian of
    −log p(x, z) (``curvature="hessian"``), as :class:`CompositionalNG`
    uses them (before any positive-definite repair). A site's units are its
    batch elements and k its event size (the model site's ``event_dim``).

    Usage::

        import pyro, pyro.distributions as dist
        from curvi.model_curvature import latent_curvature

        def model(x):
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=z.sum(-1)), obs=x)

        x = torch.tensor([0.0, 1.0, 1.0])
        H = latent_curvature(model, {"z": torch.zeros(3, 2)}, x)["z"]  # (3, 2, 2): I + 1/4 (all-ones)

    :raises ValueError: for an unknown ``curvature``, or (``"ggn"``) a
        likelihood whose Fisher is not known, naming the site.
    """
    _check_choice("curvature", curvature, ("ggn", "hessian"))
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in values.items()}
    with torch.enable_grad():
        trace = poutine.trace(poutine.condition(model, data=leaves)).get_trace(*args, **kwargs)
        for name in leaves:
            trace.nodes[name]["is_observed"] = False  # latent sites, set to values
        trace.compute_log_prob()
    sizes = {name: _units(trace.nodes[name]) for name in leaves}
    return unit_curvature_blocks(trace, leaves, sizes, curvature=curvature)


def unit_curvature_blocks(trace, leaves: dict, sizes: dict, *, curvature: str) -> dict[str, torch.Tensor]:
    """H_z's unit blocks ``(units, k, k)`` by site, from a model ``trace``
    (log probabilities computed) whose latent sites hold the tensors
    ``leaves``; ``sizes[name] = (units, k)``. All units of a site are
    handled at once (one direction per latent coordinate), which assumes
    them conditionally independent, as in a data plate; different sites are
    not coupled."""
    names = list(leaves)
    leaf_list = [leaves[n] for n in names]
    blocks = {name: leaves[name].new_zeros(sizes[name] + sizes[name][1:]) for name in names}
    terms = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if curvature == "ggn" and name in leaves and _add_constant_normal_prior(site, blocks[name]):
            continue  # a root Normal prior: diag(1/scale²), no products needed
        if curvature == "hessian" or name in leaves:
            terms.append(site["log_prob_sum"])
    grads = _grads(-sum(terms), leaf_list, create_graph=True) if terms else [None] * len(names)
    for name, g, leaf in zip(names, grads, leaf_list, strict=True):
        n_units, k = sizes[name]
        if g is None or not g.requires_grad:
            continue
        g = g.reshape(n_units, k)
        for col in range(k):
            (column,) = _grads(g[:, col].sum(), [leaf], retain_graph=True)
            if column is not None:
                blocks[name][:, :, col] = column.reshape(n_units, k)
    if curvature == "ggn":
        _add_likelihood_fisher(trace, leaves, sizes, blocks)
    return {name: symmetrize(block) for name, block in blocks.items()}


def _add_constant_normal_prior(site, block):
    """Add the curvature diag(c/scale²) of a latent site's Normal prior to
    its unit blocks ``(units, k, k)`` when loc and scale are constants (a
    root site, such as a VAE's N(0, I)); ``False`` (nothing added) otherwise."""
    fn, value = site["fn"], site["value"]
    while isinstance(fn, Independent) or type(fn).__name__ == "ExpandedDistribution":
        fn = fn.base_dist
    if type(fn) not in (Normal, pyro.distributions.Normal) or fn.loc.requires_grad or fn.scale.requires_grad:
        return False
    precision = scale_and_mask(fn.scale.expand(value.shape) ** -2, site["scale"], site["mask"])
    diagonal = precision.reshape(block.shape[:-1]).to(block.dtype)
    block += torch.diag_embed(diagonal)
    return True


def _add_likelihood_fisher(trace, leaves, sizes, blocks):
    """Add the Fisher of every observed site, pulled back to each latent
    site's unit blocks, ``Jᵀ F J`` by Jacobian-vector products (double
    backpropagation, one per latent coordinate, all units at once)."""
    params, fishers = [], []
    for name, site in trace.nodes.items():
        observed = site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
        if not observed or name in leaves:
            continue
        for param, fisher in _fisher_terms(name, site):
            if param.requires_grad:
                params.append(param)
                fishers.append(fisher)
    if not params:
        return
    names = list(leaves)
    leaf_list = [leaves[n] for n in names]
    with torch.enable_grad():
        dummies = [torch.zeros_like(p, requires_grad=True) for p in params]
        pulled = _grads(params, leaf_list, grad_outputs=dummies, create_graph=True)
    for name, back, leaf in zip(names, pulled, leaf_list, strict=True):
        if back is None or not back.requires_grad:
            continue
        n_units, k = sizes[name]
        for col in range(k):
            direction = leaf.new_zeros(n_units, k)
            direction[:, col] = 1
            direction = direction.reshape(back.shape)
            tangents = _grads(back, dummies, grad_outputs=direction, retain_graph=True)
            weighted = [
                fisher(t) if t is not None else torch.zeros_like(p)
                for fisher, t, p in zip(fishers, tangents, params, strict=True)
            ]
            (column,) = _grads(params, [leaf], grad_outputs=weighted, retain_graph=True)
            if column is not None:
                blocks[name][:, :, col] += column.reshape(n_units, k)


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _grads(outputs, inputs, *, grad_outputs=None, retain_graph=False, create_graph=False):
    """``torch.autograd.grad`` with unused inputs as ``None`` and no error
    when nothing requires grad."""
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    keep = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not keep or not inputs:
        return [None] * len(inputs)
    if grad_outputs is not None:
        grad_outputs = (
            [grad_outputs[i] for i in keep] if isinstance(grad_outputs, (list, tuple)) else [grad_outputs]
        )
    with torch.enable_grad():
        return list(
            torch.autograd.grad(
                [outs[i] for i in keep],
                inputs,
                grad_outputs=grad_outputs,
                retain_graph=retain_graph or create_graph,
                create_graph=create_graph,
                allow_unused=True,
            )
        )


def _units(site):
    """``(units, k)``: a latent site's batch elements and event size."""
    value = site["value"]
    event_dim = site["fn"].event_dim
    k = math.prod(value.shape[value.dim() - event_dim :]) if event_dim else 1
    return (value.numel() // max(k, 1), k)


def _fisher_terms(name, site):
    """``[(parameter, F)]`` for an observed site: the parameter tensors of
    its distribution and, for each, ``F(u)``, the Fisher in that parameter
    applied to a tangent ``u`` (scaled and masked as the site is).

    :raises ValueError: for a family whose Fisher is not known here.
    """
    fn = site["fn"]
    weight = scale_and_mask(torch.ones_like(site["unscaled_log_prob"]), site["scale"], site["mask"])
    while True:
        if isinstance(fn, Independent):
            weight = weight.reshape(weight.shape + (1,) * fn.reinterpreted_batch_ndims)
            fn = fn.base_dist
        elif type(fn).__name__ == "MaskedDistribution":
            weight = weight * fn._mask
            fn = fn.base_dist
        elif type(fn).__name__ == "ExpandedDistribution":
            fn = fn.base_dist
        else:
            break
    batch = torch.broadcast_shapes(weight.shape, fn.batch_shape)
    weight = weight.detach().expand(batch)

    def elementwise(param, w):
        def fisher(u):
            return (u.expand(batch) * w.expand(batch)).sum_to_size(param.shape)

        return param, fisher

    if isinstance(fn, Bernoulli):
        p = torch.sigmoid(fn.logits.detach())
        return [elementwise(fn.logits, weight * p * (1 - p))]
    if isinstance(fn, Poisson):
        return [elementwise(fn.rate, weight / fn.rate.detach())]
    if isinstance(fn, Normal):
        precision = weight / fn.scale.detach() ** 2
        return [elementwise(fn.loc, precision), elementwise(fn.scale, 2 * precision)]
    if isinstance(fn, Categorical):
        logits = fn.logits
        p = fn.probs.detach()
        full = batch + p.shape[-1:]

        def fisher(u):
            u = u.expand(full)
            pu = p.expand(full) * u
            return (weight.unsqueeze(-1) * (pu - p.expand(full) * pu.sum(-1, keepdim=True))).sum_to_size(
                logits.shape
            )

        return [(logits, fisher)]
    raise ValueError(
        f"curvature='ggn' knows the Fisher of Bernoulli, Categorical, Normal and Poisson likelihoods, and "
        f"observed site '{name}' is {type(site['fn']).__name__}: use curvature='hessian' (the plate-aware "
        "Hessian of log p in each unit's latents)"
    )

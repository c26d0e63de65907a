"""Central finite differences for gradient checks (float64)."""

import torch


def central_gradient(fn, x, eps=1e-5):
    """∂fn/∂x at x for a scalar function of a 1-d tensor, by central differences."""
    x = x.detach()
    return torch.stack(
        [(fn(x + eps * e) - fn(x - eps * e)).detach() / (2 * eps) for e in torch.eye(len(x), dtype=x.dtype)]
    )

"""Reference posterior of the demo's cbpp model by Pyro's NUTS.

Prints the means and sds stored as ``curvi.datasets.CBPP_NUTS`` (about 7
minutes on a 2-core machine). Usage: ``python benchmarks/cbpp_nuts.py``.
"""

import time

import pyro
import torch
from pyro.infer import MCMC, NUTS

from curvi.datasets import load_cbpp
from curvi.demo import cbpp_model


def main(warmup=1500, draws=8000, seed=1):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(seed)
    data = load_cbpp()
    start = time.perf_counter()
    mcmc = MCMC(NUTS(cbpp_model), warmup_steps=warmup, num_samples=draws, disable_progbar=True)
    mcmc.run(data.design, data.herd, data.size, data.incidence)
    samples = mcmc.get_samples()
    mcmc.summary()
    beta, sigma = samples["beta"], samples["sigma"]
    print(f"{time.perf_counter() - start:.0f} s")
    print("fixed_effects_mean", tuple(round(v, 4) for v in beta.mean(0).tolist()))
    print("fixed_effects_sd", tuple(round(v, 4) for v in beta.std(0).tolist()))
    print("herd_sd_mean", round(sigma.mean().item(), 4), "herd_sd_sd", round(sigma.std().item(), 4))


if __name__ == "__main__":
    main()

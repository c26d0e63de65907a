"""Ad-hoc measurement: LaplaceNewton inside SVI (noisy gradients) on the benchmark
model; ELBO gap to a fit_newton reference (128 particles x 4 blocks) by common
random numbers after given steps, for (particles, decay) settings.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/natural_svi.py 1000
"""
import sys, time, math, statistics, torch, pyro, warnings
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import simulate, torch_model
from curvi import AmortizedLaplaceGuide, LaplaceNewton, fit_newton, FixedNoise, particle_elbos
from pyro.infer import SVI, Trace_ELBO
warnings.simplefilter("ignore")
torch.set_num_threads(1); torch.set_default_dtype(torch.float64)
N = int(sys.argv[1])
x, y, *_ = simulate(N, seed=0); data = (torch.tensor(x), torch.tensor(y))
pyro.clear_param_store()
guide = AmortizedLaplaceGuide(torch_model, unit_plate="groups")
with pyro.poutine.block(): guide(*data)
theta0 = guide.loc_global_unconstrained.detach().clone()
ref = fit_newton(torch_model, guide, *data, num_particles=128, blocks=4, eval_particles=128, seed=999)
theta_star = ref.theta; print("ref", ref.message)
def gap(theta, chunks=4):
    d = []
    p = guide.loc_global_unconstrained
    for c in range(chunks):
        v = []
        for pt in (theta_star, theta):
            with torch.no_grad():
                p.copy_(pt)
                with FixedNoise(7000 + c):
                    v.append(particle_elbos(torch_model, guide, *data, num_particles=64, max_plate_nesting=2).mean().item())
        d.append(v[0] - v[1])
    return statistics.fmean(d)
for K, decay, steps in [(1, 0.0, 60), (1, 0.5, 60), (1, 1.0, 60), (8, 0.0, 60), (8, 0.5, 60), (8, 1.0, 60), (32, 0.5, 60)]:
    with torch.no_grad(): guide.loc_global_unconstrained.copy_(theta0)
    pyro.set_rng_seed(0)
    opt = LaplaceNewton(guide, decay=decay)
    loss = Trace_ELBO(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=2)
    svi = SVI(torch_model, guide, opt, loss)
    thetas = []; t0 = time.perf_counter(); times = []
    for s in range(steps):
        svi.step(*data); thetas.append(guide.loc_global_unconstrained.detach().clone()); times.append(time.perf_counter() - t0)
    gaps = {s: round(gap(thetas[s - 1]), 3) for s in (1, 2, 3, 5, 10, 20, 30, 45, 60)}
    print(f"K={K} decay={decay}: {times[-1]/steps*1000:.0f} ms/step; gap (nat) after steps {gaps}", flush=True)

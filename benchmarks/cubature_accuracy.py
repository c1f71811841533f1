"""Accuracy, node counts and speed of ``kl_sweep.core.cubature`` (general mixture targets in d dimensions).

Sections (each prints a table; nothing is asserted):

1. nodes: nodes per row of the default panel rule by divergence, K and d.
2. scipy: every divergence on three 2-D targets with unequal covariances (well separated,
   overlapping, a narrow component) against scipy's adaptive cubature of the textbook integrands.
3. random 2-D: K = 1, 2, 3 random targets (log-uniform standard deviations e^-2..e^1 per axis,
   random rotations, so components up to 20:1 elongated and 20x narrower than Q) against the rule
   at 64 panels of 10 nodes a level (itself checked against scipy on the worst rows): worst and
   median relative error of the default, and of 12 and 16 panels (a cheaper rule for fit steps).
4. 3-D: K = 1 against the closed form, K = 2 against 20 panels, at 8, 10, 12 and 14 (default) panels.
5. QMC: d = 5 and 8, K = 1 against the closed forms (error in standard errors) and the size of
   the standard error; K = 2 against a QMC run with 16x the points.
6. speed: B rows (default 1000) in d = 2 (default panels) and d = 5 (default QMC), value only and
   value with its gradient, wall time and peak resident memory.

    python benchmarks/cubature_accuracy.py [--batch 1000] [--threads 2] [--skip random,3d]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kl_sweep.core import cubature as cb
from kl_sweep.core.divergences import get_divergence
from kl_sweep.core.gaussians import MixtureND

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_cubature import MEMBERS_2D, TARGETS_2D, scipy_divergences  # noqa: E402  (the tests' own)

MEMBERS = MEMBERS_2D


def label(name, alpha) -> str:
    return name if alpha is None else f"{name}({alpha:g})"


def to_mixture(weights, means, covs) -> MixtureND:
    w, m, c = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (weights, means, covs))
    if w.dim() == 1:
        w, m, c = w[None], m[None], c[None]
    return MixtureND(torch.log(w), m, torch.linalg.cholesky(c))


def scipy_values(weights, means, covs, q_mean, q_cov, kl_only=False) -> tuple[dict, float]:
    """The tests' scipy reference (``tests/test_cubature.py``: adaptive cubature of the textbook
    integrands, rtol 1e-12), and the seconds it took."""
    start = time.perf_counter()
    values = scipy_divergences(weights, means, covs, q_mean, q_cov, kl_only=kl_only, converged=False)
    return values, time.perf_counter() - start


def random_targets(seed, B, K, d, spread=3.0):
    """B random targets and Q's (see section 3 of the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def covariance(n, lo, hi):
        rot, _ = torch.linalg.qr(torch.randn(B, n, d, d, generator=g, dtype=torch.float64))
        sd = torch.exp(lo + (hi - lo) * torch.rand(B, n, d, generator=g, dtype=torch.float64))
        c = rot @ torch.diag_embed(sd * sd) @ rot.transpose(-1, -2)
        return 0.5 * (c + c.transpose(-1, -2))

    w = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.2
    means = spread * torch.randn(B, K, d, generator=g, dtype=torch.float64)
    mix = MixtureND(
        torch.log(w / w.sum(-1, keepdim=True)), means, torch.linalg.cholesky(covariance(K, -2.0, 1.0))
    )
    q_mean = means.mean(1) + torch.randn(B, d, generator=g, dtype=torch.float64)
    return mix, q_mean, torch.linalg.cholesky(covariance(1, -1.0, 1.5)[:, 0])


def section_nodes():
    print("\n== 1. nodes per row of the default panel rule (panels per level x 8 nodes, to the power d)")
    print(f"{'divergence':18s}" + "".join(f"  K={K} d={d}" for d in (2, 3) for K in (1, 2, 3)))
    for name in ("forward", "jensen_shannon", "hellinger", "alpha"):
        row = f"{name:18s}"
        for d in (2, 3):
            for K in (1, 2, 3):
                sources, pairs = cb.structure(get_divergence(name), K)
                panels = cb.default_panels(d, K, sources, pairs)
                row += f"  {(panels * cb.default_order(d)) ** d:9,d}"
        print(row)


def section_scipy():
    print(
        "\n== 2. against scipy.integrate.cubature (rtol 1e-12) of the textbook integrands, 2-D, default rule"
    )
    print(f"{'target':12s} {'divergence':16s} {'value':>18s} {'scipy':>18s} {'rel. error':>10s}")
    for target, (weights, means, covs, q_mean, q_cov) in TARGETS_2D.items():
        reference, seconds = scipy_values(weights, means, covs, q_mean, q_cov)
        mix = to_mixture(weights, means, covs)
        mean = torch.tensor([q_mean], dtype=torch.float64)
        tril = torch.linalg.cholesky(torch.tensor([q_cov], dtype=torch.float64))
        for name, alpha in MEMBERS:
            value = cb.divergence_nd(name, mix, mean, tril, alpha)[0].item()
            ref = reference[(name, alpha)]
            error = abs(value - ref) / ref
            print(f"{target:12s} {label(name, alpha):16s} {value:18.12g} {ref:18.12g} {error:10.1e}")
        print(f"{'':12s} (scipy: {seconds:.1f} s for all nine)")


def section_random():
    print("\n== 3. random 2-D targets against 64 panels of 10 nodes a level: worst / median relative error")
    print(f"{'K':>2s} {'divergence':16s} {'rows':>4s} {'default':>17s} {'16 panels':>17s} {'12 panels':>17s}")
    for K in (1, 2, 3):
        mix, mean, tril = random_targets(K, 24, K, 2)
        for name, alpha in MEMBERS:
            finite = cb.finite_nd(name, mix, mean, tril, alpha)
            if not finite.any():
                continue
            idx = finite.nonzero()[:, 0]
            m, a, b = mix[idx], mean[idx], tril[idx]
            ref = cb.divergence_nd(name, m, a, b, alpha, rule=cb.Panels(order=10, panels=64))[0]
            cells = []
            for rule in (None, cb.Panels(panels=16), cb.Panels(panels=12)):
                err = (
                    (cb.divergence_nd(name, m, a, b, alpha, rule=rule)[0] - ref).abs() / ref.abs()
                ).double()
                cells.append(f"{err.max().item():8.0e}/{err.median().item():8.0e}")
            print(f"{K:2d} {label(name, alpha):16s} {len(idx):4d} " + " ".join(f"{c:>17s}" for c in cells))
    # the reference itself, against scipy, on the hardest rows of K = 3 (reverse KL, Q wide)
    mix, mean, tril = random_targets(3, 24, 3, 2)
    ref = cb.divergence_nd("reverse", mix, mean, tril, rule=cb.Panels(order=10, panels=64))[0]
    default = cb.divergence_nd("reverse", mix, mean, tril)[0]
    worst = ((default - ref).abs() / ref).argsort(descending=True)[:3]
    for i in worst.tolist():
        covs = (mix.scale_trils[i] @ mix.scale_trils[i].transpose(-1, -2)).numpy()
        values, _ = scipy_values(
            torch.exp(mix.log_weights[i]).numpy(),
            mix.means[i].numpy(),
            covs,
            mean[i].numpy(),
            (tril[i] @ tril[i].T).numpy(),
            kl_only=True,
        )
        sc = values[("reverse", None)]
        ref_error, default_error = abs(ref[i].item() - sc) / sc, abs(default[i].item() - sc) / sc
        print(
            f"   K=3 reverse row {i}: scipy {sc:.12g}; reference {ref_error:.1e}, default {default_error:.1e}"
        )


def kl_gauss(m0, S0, m1, S1):
    S1i = torch.linalg.inv(S1)
    dm = m1 - m0
    quad = (dm[..., None, :] @ S1i @ dm[..., :, None])[..., 0, 0]
    trace = torch.diagonal(S1i @ S0, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * (trace + quad - m0.shape[-1] + torch.logdet(S1) - torch.logdet(S0))


def section_3d():
    print("\n== 3-D (panels a level x 8 nodes)^3: worst relative error over the rows")
    mix, mean, tril = random_targets(11, 3, 1, 3)
    S0 = mix.scale_trils[:, 0] @ mix.scale_trils[:, 0].transpose(-1, -2)
    exact = {
        "forward": kl_gauss(mix.means[:, 0], S0, mean, tril @ tril.transpose(-1, -2)),
        "reverse": kl_gauss(mean, tril @ tril.transpose(-1, -2), mix.means[:, 0], S0),
    }
    for panels in (8, 10, 12, 14):
        start = time.perf_counter()
        errs = {
            n: ((cb.divergence_nd(n, mix, mean, tril, rule=cb.Panels(panels=panels))[0] - e).abs() / e).max()
            for n, e in exact.items()
        }
        print(
            f"K=1 vs closed form, {panels:2d} panels ({(8 * panels) ** 3:9,d} nodes): "
            + ", ".join(f"{n} {e.item():.1e}" for n, e in errs.items())
            + f"  ({time.perf_counter() - start:.1f} s)"
        )
    mix, mean, tril = random_targets(12, 3, 2, 3)
    for name in ("forward", "reverse"):
        ref = cb.divergence_nd(name, mix, mean, tril, rule=cb.Panels(panels=20))[0]
        for panels in (8, 10, 12, 14):
            value = cb.divergence_nd(name, mix, mean, tril, rule=cb.Panels(panels=panels))[0]
            worst = ((value - ref).abs() / ref).max().item()
            print(f"K=2 {name:8s} vs 20 panels, {panels:2d} panels: {worst:.1e}")


def section_qmc():
    print("\n== 5. QMC (1024 points a source, 8 randomisations): K = 1 against the closed forms")
    for d in (5, 8):
        mix, mean, tril = random_targets(d, 16, 1, d)
        S0 = mix.scale_trils[:, 0] @ mix.scale_trils[:, 0].transpose(-1, -2)
        S1 = tril @ tril.transpose(-1, -2)
        for name, exact in (
            ("forward", kl_gauss(mix.means[:, 0], S0, mean, S1)),
            ("reverse", kl_gauss(mean, S1, mix.means[:, 0], S0)),
        ):
            start = time.perf_counter()
            value, error = cb.divergence_nd(name, mix, mean, tril)
            z = (value - exact) / error
            z_max, z_rms = z.abs().max().item(), z.pow(2).mean().sqrt().item()
            print(
                f"d={d} {name:8s}: |z| max {z_max:.2f}, rms {z_rms:.2f},"
                f" standard error / value {(error / exact).median().item():.1e} (median);"
                f" {time.perf_counter() - start:.2f} s for 16 rows"
            )
    for d in (5, 8):
        mix, mean, tril = random_targets(d + 100, 8, 2, d)
        for name, alpha in (("reverse", None), ("jensen_shannon", None), ("alpha", 0.5)):
            value, error = cb.divergence_nd(name, mix, mean, tril, alpha)
            ref, ref_error = cb.divergence_nd(
                name, mix, mean, tril, alpha, rule=cb.QuasiMonteCarlo(points=16384, seed=99)
            )
            z = (value - ref) / torch.sqrt(error**2 + ref_error**2)
            print(
                f"d={d} K=2 {label(name, alpha):12s}: |z| max {z.abs().max().item():.2f};"
                f" standard error / value {(error / value).median().item():.1e};"
                f" the reference's {(ref_error / ref).median().item():.1e}"
            )


def section_speed(batch: int):
    print(f"\n== 6. speed: B = {batch} rows, reverse KL, K = 2 ({torch.get_num_threads()} threads)")
    for d in (2, 5):
        mix, mean, tril = random_targets(2, batch, 2, d)
        for grad in (False, True):
            m, L = mean.clone().requires_grad_(grad), tril.clone().requires_grad_(grad)
            start = time.perf_counter()
            value, _ = cb.divergence_nd("reverse", mix, m, L)
            if grad:
                torch.autograd.grad(value.sum(), (m, L))
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            rule = "panels" if d <= 3 else "QMC"
            print(
                f"d={d} ({rule}) {'value + gradient' if grad else 'value':17s}: {seconds:6.1f} s,"
                f" {1e3 * seconds / batch:.1f} ms a row; peak resident memory so far {peak:.1f} GB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma-separated: nodes,scipy,random,3d,qmc,speed")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if "nodes" not in skip:
        section_nodes()
    if "scipy" not in skip:
        section_scipy()
    if "random" not in skip:
        section_random()
    if "3d" not in skip:
        section_3d()
    if "qmc" not in skip:
        section_qmc()
    if "speed" not in skip:
        section_speed(args.batch)


if __name__ == "__main__":
    main()

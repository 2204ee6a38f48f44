"""What distinguishes ADMM's channel masks from SPAP's on SmolLM2-135M down_proj (30% channels, dense inputs).

End to end ADMM's masks transfer better to WikiText-2 although their layer error is higher
(``docs/results.md``).  On the cached dense-input Gram matrices of every ``mlp.down_proj`` (576×1536) this
solves SPAP and ADMM + exact refit (SPAP also at ``damp=0.001`` and without its swap search; ADMM at
``damp=0.001`` with ``--admm-damp``) and prints,
per layer and averaged (all, blocks 0-14, blocks 15-29):

1. masks: channels pruned by SPAP only / ADMM only, and how other pairs of masks differ (SPAP at damp 0.001,
   SPAP's penalty-path mask before the swap search, the proposals);
2. the SPAP-only-pruned against the ADMM-only-pruned channels: percentile rank in the layer (0 = smallest)
   of ``H_jj``, ``‖W_:,j‖``, Wanda's ``‖W_:,j‖² H_jj``, OBS's ``‖W_:,j‖²/[H_d⁻¹]_jj``, ``|mean x_j|``; the
   median of ``H_jj`` over the layer mean and of its shift to the validation Gram (``H_jj/mean`` there over
   ``H_jj/mean`` here); the DC share ``mean_j² / (H_jj/N)``; the redundancy ``R²`` of
   ``x_j`` regressed on the channels both masks keep (uncentred, ``1 − S_jj/H_jj`` with the Schur
   complement, and centred); the |correlation| with the largest-activation channel; ADMM's gradual path
   (in how many of its 15 mask selections the channel was kept);
3. the compensating update ``‖Ŵ_K − W_K‖_F / ‖W_K‖_F`` and the smallest eigenvalue (over mean diag H) and
   condition number of the undamped ``H_KK`` of each kept set;
4. relative errors on the calibration Gram and on a held-out Gram (32 windows of the validation split,
   ``real_layers.load(32, split="validation")``; never WikiText-2 or C4 [500:]); the "val refit" column
   refits each mask on the validation Gram itself (damp 0.001): the mask's own quality there, without the
   cost of carrying calibration weights over;
5. proposals tested at the layer level: SPAP on ``H + α·diag(H)`` (a ridge in ADMM's preconditioned
   basis, scale-free, instead of the uniform ``δ·mean(diag H)``), returned as solved and refit exactly
   at damp 0.001 (``--alphas``); SPAP's and ADMM's masks refit with other uniform dampings (``--refit-damps``)
   and on ``H + α·diag(H)`` (``--refit-alphas``), and with no compensation at all ("zeroed").

Needs both Gram caches (``python benchmarks/real_layers.py`` and ``--split validation --n 32``).

    python benchmarks/mask_study.py --threads 1 --plot mask_study.png
    python benchmarks/mask_study.py --threads 1 --layers 0 2 4 6 8 10 12 14 16 18 20 22 24 26 28
        --summary-only --refit-damps 0.03 0.1 --refit-alphas 0.1 0.3 1          (one command line)

On one thread of a shared 2-core CPU: 16 s a block (8 min for all 30), 22 s with the extra refits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import solvers
from real_layers import load, n_layers, problem
from solvers.refit import refit_columns

LINEAR = "mlp.down_proj"
SPARSITY = 0.3
EARLY = range(0, 15)


# --- solutions ---------------------------------------------------------------------------------------------


class AdmmPath:
    """Records the masks ADMM's gradual selection chooses (wraps ``solvers.admm._select``)."""

    def __init__(self) -> None:
        self.module = sys.modules["solvers.admm"]
        self.original = self.module._select
        self.masks: list[torch.Tensor] = []

    def __enter__(self):
        def select(problem, S, k_t):
            keep = self.original(problem, S, k_t)
            self.masks.append(keep.clone())
            return keep

        self.masks = []
        self.module._select = select
        return self

    def __exit__(self, *exc) -> None:
        self.module._select = self.original


def solve_layer(cal: dict, layer: int, alphas: list[float], admm_damp: bool, refit_damps: list[float] = (),
                refit_alphas: list[float] = ()) -> tuple[dict, dict, list[torch.Tensor]]:
    """Every solution of one layer: name -> (Ŵ float64, keep, stats); the problems; ADMM's path."""
    p = problem(cal, layer, LINEAR, solvers.channels, sparsity=SPARSITY)
    p3 = problem(cal, layer, LINEAR, solvers.channels, sparsity=SPARSITY, damp=0.001)
    sols = {}

    def add(name, sol):
        sols[name] = (sol.weight.to(torch.float64), sol.keep, sol.stats)

    add("spap", solvers.solve(p, "spap"))
    with AdmmPath() as path:
        add("admm+refit", solvers.solve(p, "admm", final="refit"))
    add("spap@0.001", solvers.solve(p3, "spap"))
    if admm_damp:
        add("admm+refit@0.001", solvers.solve(p3, "admm", final="refit"))
    add("spap noswap", solvers.solve(p, "spap", swap=False))
    for a in alphas:  # proposal: SPAP on H + α diag(H) (scale-free ridge), tiny uniform damping
        H = p.H64 + a * torch.diag(p.H64.diagonal())
        pa = solvers.LayerProblem(p.W64, H, p.structure, sparsity=SPARSITY, damp=0.001,
                                  input_mean=p.input_mean, n_samples=p.n_samples)
        sol = solvers.solve(pa, "spap")
        add(f"diag{a:g}", sol)
        sols[f"diag{a:g}+refit"] = (refit_columns(p3, sol.keep), sol.keep, sol.stats)
    for damp in refit_damps:  # the same masks, refit with another uniform ridge toward W
        pd = problem(cal, layer, LINEAR, solvers.channels, sparsity=SPARSITY, damp=damp)
        for name in ("spap", "admm+refit"):
            keep = sols[name][1]
            sols[f"{name.split('+')[0]} refit@{damp:g}"] = (refit_columns(pd, keep), keep, {})
    for a in refit_alphas:  # the same masks, refit with a ridge toward W in ADMM's basis: H + a diag(H) (+ 0.001)
        Ha = p3.hessian + a * torch.diag(p.H64.diagonal())
        for name in ("spap", "admm+refit"):
            keep = sols[name][1]
            sols[f"{name.split('+')[0]} refit-diag{a:g}"] = (refit_columns(p, keep, Ha), keep, {})
    for name in ("spap", "admm+refit"):  # no compensation at all: the pruned columns zeroed
        keep = sols[name][1]
        sols[f"{name.split('+')[0]} zeroed"] = (p.W64 * keep.to(torch.float64)[None, :], keep, {})
    return sols, {"p": p, "p3": p3}, path.masks


# --- channel statistics ------------------------------------------------------------------------------------


def pct_rank(x: torch.Tensor) -> torch.Tensor:
    """Percentile rank in [0, 1] (0 = smallest)."""
    r = torch.empty_like(x, dtype=torch.float64)
    r[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=torch.float64)
    return r / (x.numel() - 1)


def r_squared(H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``1 − S_jj/H_jj`` for every channel outside ``keep``: the share of ``Σ x_j²`` that the channels in
    ``keep`` explain (``S`` the Schur complement of ``H_KK``); NaN for the channels in ``keep``."""
    K, J = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
    HKK = H[K][:, K]
    HKK = HKK + 1e-9 * HKK.diagonal().mean() * torch.eye(len(K), dtype=H.dtype)
    X = torch.cholesky_solve(H[K][:, J], torch.linalg.cholesky(HKK))
    S = H.diagonal()[J] - (H[K][:, J] * X).sum(0)
    out = torch.full((H.shape[0],), float("nan"), dtype=H.dtype)
    out[J] = 1 - S / H.diagonal()[J]
    return out


def channel_table(p, keep_s: torch.Tensor, keep_a: torch.Tensor, admm_masks: list[torch.Tensor],
                  Hv: torch.Tensor) -> dict:
    """Properties of the SPAP-only-pruned (``s``) and ADMM-only-pruned (``a``) channels; ``Hv`` the
    validation Gram (for the shift of each channel's share of the energy)."""
    H, W = p.H64, p.W64
    N = p.n_samples
    d = H.diagonal()
    mu = p.input_mean.to(torch.float64)
    norms2 = (W * W).sum(0)
    Hinv_d = p.hessian_inverse.diagonal()
    feats = {
        "H_jj": pct_rank(d),
        "|W_j|": pct_rank(norms2),
        "wanda": pct_rank(norms2 * d),
        "obs": pct_rank(norms2 / Hinv_d),
        "|mean|": pct_rank(mu.abs()),
    }
    C = H / N - torch.outer(mu, mu)  # centred covariance
    both = keep_s & keep_a
    m = int(torch.argmax(d))
    extra = {
        "H/mean": d / d.mean(),
        "val/cal": (Hv.diagonal() / Hv.diagonal().mean()) / (d / d.mean()),
        "dc": mu * mu / (d / N),
        "R2": r_squared(H, both),
        "R2c": r_squared(C, both),
        "|corr_m|": (C[:, m] / (C.diagonal() * C[m, m]).sqrt()).abs(),
        "admm kept": torch.stack(admm_masks).double().sum(0) if admm_masks else torch.full_like(d, float("nan")),
    }
    s_only, a_only = keep_a & ~keep_s, keep_s & ~keep_a
    out = {"n": int(s_only.sum())}
    for name, v in {**feats, **extra}.items():
        agg = torch.median if name in ("H/mean", "val/cal") else torch.mean
        for tag, sel in (("s", s_only), ("a", a_only)):
            out[f"{name} {tag}"] = float(agg(v[sel])) if sel.any() else float("nan")
    both_pruned = ~keep_s & ~keep_a
    out["admm kept both"] = float(extra["admm kept"][both_pruned].mean())
    out["massive kept"] = bool(keep_s[m] and keep_a[m])
    out["median H/mean"] = float((d / d.mean()).median())
    return out


# --- kept-set diagnostics and errors ------------------------------------------------------------------------


def update_size(p, W_hat: torch.Tensor, keep: torch.Tensor) -> float:
    W = p.W64
    return float((W_hat[:, keep] - W[:, keep]).norm() / W[:, keep].norm())


def kept_spectrum(p, keep: torch.Tensor) -> tuple[float, float]:
    """Smallest eigenvalue of the undamped ``H_KK`` over mean diag H, and its condition number."""
    K = torch.nonzero(keep).flatten()
    lam = torch.linalg.eigvalsh(p.H64[K][:, K])
    return float(lam[0] / p.H64.diagonal().mean()), float(lam[-1] / lam[0].clamp_min(1e-300))


def layer_rows(cal: dict, val: dict, layer: int, alphas: list[float], admm_damp: bool = False,
               refit_damps: list[float] = (), refit_alphas: list[float] = ()) -> dict:
    start = time.perf_counter()
    sols, probs, admm_masks = solve_layer(cal, layer, alphas, admm_damp, refit_damps, refit_alphas)
    p = probs["p"]
    Hv, _, count_v = val["grams"][f"model.layers.{layer}.{LINEAR}"]
    pv = solvers.LayerProblem(p.W64, Hv, p.structure, sparsity=SPARSITY, damp=0.001, n_samples=count_v)
    row = {"layer": layer}
    for name, (W_hat, keep, stats) in sols.items():
        cal_err, val_err = p.relative_error(W_hat), pv.relative_error(W_hat)
        row[name] = {"cal": cal_err, "val": val_err, "val refit": pv.relative_error(refit_columns(pv, keep)),
                     "update": update_size(p, W_hat, keep), "keep": keep, "swaps": stats.get("swaps")}
    for name in (n for n in ("spap", "admm+refit", "spap@0.001", "admm+refit@0.001") if n in sols):
        row[name]["lam_min"], row[name]["cond"] = kept_spectrum(p, sols[name][1])
    row["channels"] = channel_table(p, sols["spap"][1], sols["admm+refit"][1], admm_masks, Hv.to(torch.float64))
    row["seconds"] = time.perf_counter() - start
    return row


# --- printing ----------------------------------------------------------------------------------------------


def differ(a: torch.Tensor, b: torch.Tensor) -> int:
    """Channels pruned by ``a`` and kept by ``b`` (= the reverse count: equal targets)."""
    return int((~a & b).sum())


def summary(rows: list[dict], value) -> str:
    """``all / early / late`` means of ``value(row)``."""
    def mean(rs):
        xs = [value(r) for r in rs]
        xs = [x for x in xs if x == x]
        return statistics.fmean(xs) if xs else float("nan")

    early = [r for r in rows if r["layer"] in EARLY]
    late = [r for r in rows if r["layer"] not in EARLY]
    return mean(rows), mean(early), mean(late)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, object]], per_layer: bool) -> None:
    """``columns``: (header, format, value(row))."""
    print(f"\n{title}")
    width = [max(len(h), 8) for h, _, _ in columns]
    print(f"{'layer':>6} " + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, width)))
    if per_layer:
        for r in rows:
            print(f"{r['layer']:>6} " + " ".join(f"{format(fn(r), fmt):>{w}}" for (_, fmt, fn), w in zip(columns, width)))
    for label, i in (("all", 0), ("0-14", 1), ("15-29", 2)):
        vals = [summary(rows, fn)[i] for _, _, fn in columns]
        fmts = [".1f" if fmt == "d" else fmt for _, fmt, _ in columns]
        print(f"{label:>6} " + " ".join(f"{format(v, fmt):>{w}}" for v, fmt, w in zip(vals, fmts, width)))


def report(rows: list[dict], alphas: list[float], per_layer: bool, refit_damps: list[float] = (),
           refit_alphas: list[float] = ()) -> None:
    S, A = "spap", "admm+refit"
    admm_damp = "admm+refit@0.001" in rows[0]
    k = lambda name: (lambda r: r[name]["keep"])  # noqa: E731
    cols = [("spap-only", "d", lambda r: differ(k(S)(r), k(A)(r))),
            ("S|S@.001", "d", lambda r: differ(k(S)(r), k("spap@0.001")(r))),
            ("S@.001|A", "d", lambda r: differ(k("spap@0.001")(r), k(A)(r)))]
    if admm_damp:
        cols += [("S@.001|A@.001", "d", lambda r: differ(k("spap@0.001")(r), k("admm+refit@0.001")(r))),
                 ("A|A@.001", "d", lambda r: differ(k(A)(r), k("admm+refit@0.001")(r)))]
    cols += [("noswap|A", "d", lambda r: differ(k("spap noswap")(r), k(A)(r))),
             ("noswap|S", "d", lambda r: differ(k("spap noswap")(r), k(S)(r))),
             ("swaps", "d", lambda r: r[S]["swaps"] or 0)]
    cols += [(f"diag{a:g}|A", "d", (lambda a: lambda r: differ(k(f"diag{a:g}")(r), k(A)(r)))(a)) for a in alphas]
    cols += [(f"diag{a:g}|S", "d", (lambda a: lambda r: differ(k(f"diag{a:g}")(r), k(S)(r)))(a)) for a in alphas]
    print_table("1. masks: channels pruned by the first mask and kept by the second (of 461 pruned)", rows, cols,
                per_layer)

    c = lambda key: (lambda r: r["channels"][key])  # noqa: E731
    cols = []
    for name in ("H_jj", "|W_j|", "wanda", "obs", "|mean|"):
        cols += [(f"{name} s", ".3f", c(f"{name} s")), (f"{name} a", ".3f", c(f"{name} a"))]
    print_table("2a. SPAP-only-pruned (s) vs ADMM-only-pruned (a) channels: mean percentile rank in the layer "
                "(0 = smallest)", rows, cols, per_layer)
    cols = [("med H/mean", ".3f", c("median H/mean"))]
    for name in ("H/mean", "val/cal", "dc", "R2", "R2c", "|corr_m|", "admm kept"):
        cols += [(f"{name} s", ".3f", c(f"{name} s")), (f"{name} a", ".3f", c(f"{name} a"))]
    cols.append(("admm kept both", ".2f", c("admm kept both")))
    cols.append(("top kept", "d", lambda r: int(r["channels"]["massive kept"])))
    print_table("2b. same channels: median H_jj/mean(diag H) (layer: all channels), median ratio of H_jj/mean(diag H) validation/calibration, DC share mean²/(H_jj/N), "
                "R² on the channels both keep (uncentred, centred), |corr| with the largest-H_jj channel, "
                "ADMM selections (of 15) keeping it ('both': channels both prune); largest-H_jj channel kept by both", rows, cols, per_layer)

    names = [S, A, "spap@0.001"] + (["admm+refit@0.001"] if admm_damp else [])
    cols = [(f"upd {n}", ".4f", (lambda n: lambda r: r[n]["update"])(n)) for n in names]
    cols += [(f"lmin {n}", ".2e", (lambda n: lambda r: r[n]["lam_min"])(n)) for n in names[:2]]
    cols += [(f"cond {n}", ".3g", (lambda n: lambda r: r[n]["cond"])(n)) for n in names[:2]]
    print_table("3. compensating update |Ŵ_K−W_K|_F/|W_K|_F; undamped H_KK: smallest eigenvalue / mean diag H, "
                "condition number", rows, cols, per_layer)

    variants = names + ["spap noswap"] + [f"diag{a:g}{s}" for a in alphas for s in ("", "+refit")]
    variants += [f"{n} refit@{d:g}" for d in refit_damps for n in ("spap", "admm")]
    variants += [f"{n} refit-diag{a:g}" for a in refit_alphas for n in ("spap", "admm")]
    variants += ["spap zeroed", "admm zeroed"]
    for what in ("cal", "val", "val refit"):
        cols = [(n, ".5f", (lambda n: lambda r: r[n][what])(n)) for n in variants]
        print_table(f"4. relative error on the {'calibration' if what == 'cal' else 'validation'} Gram"
                    f"{' (mask refit on the validation Gram)' if what == 'val refit' else ''}",
                    rows, cols, per_layer and what != "val refit")
    cols = [(n, ".4f", (lambda n: lambda r: r[n]["val"] / r[n]["cal"])(n)) for n in variants]
    print_table("4b. validation / calibration error", rows, cols, False)
    for what in ("cal", "val", "val refit"):
        cols = [(n, "+.2%", (lambda n, w: lambda r: r[n][w] / r[S][w] - 1)(n, what)) for n in variants if n != S]
        print_table(f"4c. {what} error relative to spap (mean of per-layer ratios − 1)", rows, cols, False)
    print(f"\nlayers where admm+refit beats spap: calibration "
          f"{sum(r[A]['cal'] < r[S]['cal'] for r in rows)}, validation {sum(r[A]['val'] < r[S]['val'] for r in rows)}, "
          f"validation refit {sum(r[A]['val refit'] < r[S]['val refit'] for r in rows)} of {len(rows)}")


def plot(rows: list[dict], alphas: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    refits = [n for n in rows[0] if isinstance(n, str) and n.startswith("spap refit-diag")]
    for name in ["admm+refit", "spap@0.001"] + [f"diag{a:g}" for a in alphas] + refits:
        ax1.plot(layers, [100 * (r[name]["val"] / r["spap"]["val"] - 1) for r in rows], marker="o", ms=3,
                 label=f"{name} (validation)")
    ax1.plot(layers, [100 * (r["admm+refit"]["cal"] / r["spap"]["cal"] - 1) for r in rows], "k--",
             label="admm+refit (calibration)")
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set(xlabel="block", ylabel="relative error vs spap (%)", title="down_proj, 30% channels")
    ax1.legend(fontsize=7)
    for key, style in (("R2", "o-"), ("H_jj", "s--"), ("|mean|", "^:")):
        for tag, color in (("s", "C0"), ("a", "C3")):
            ax2.plot(layers, [r["channels"][f"{key} {tag}"] for r in rows], style, color=color, ms=3,
                     label=f"{key}, {'SPAP' if tag == 's' else 'ADMM'}-only pruned")
    ax2.set(xlabel="block", ylabel="R² / percentile rank", title="channels pruned by one method only")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", help="blocks (default: all)")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.3],
                        help="proposal: SPAP on H + alpha diag(H) (damp 0.001)")
    parser.add_argument("--admm-damp", action="store_true", help="also ADMM + refit at damp 0.001 (slow)")
    parser.add_argument("--refit-damps", type=float, nargs="*", default=[],
                        help="also refit SPAP's and ADMM's masks with these uniform dampings")
    parser.add_argument("--refit-alphas", type=float, nargs="*", default=[],
                        help="also refit SPAP's and ADMM's masks on H + alpha diag(H) (damp 0.001)")
    parser.add_argument("--val-n", type=int, default=32, help="validation windows of 1024 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary-only", action="store_true", help="print only the averages")
    parser.add_argument("--plot", help="write per-layer errors and channel ranks to this image file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cal = load()
    cal["grams"] = {k: v for k, v in cal["grams"].items() if k.endswith(LINEAR)}
    val = load(args.val_n, 1024, 0, split="validation")
    layers = args.layers if args.layers is not None else list(range(n_layers(cal)))
    print(f"# SmolLM2-135M {LINEAR}, {SPARSITY:.0%} channels; calibration Gram {cal['n']}x{cal['seqlen']}, "
          f"validation Gram {val['n']}x{val['seqlen']}; {args.threads} thread(s)")
    rows = []
    for layer in layers:
        rows.append(layer_rows(cal, val, layer, args.alphas, args.admm_damp, args.refit_damps,
                               args.refit_alphas))
        r = rows[-1]
        print(f"  block {layer:2d}: {r['seconds']:.0f} s; spap-only {differ(r['spap']['keep'], r['admm+refit']['keep'])}; "
              f"val err spap {r['spap']['val']:.5f} admm+refit {r['admm+refit']['val']:.5f}", flush=True)
    report(rows, args.alphas, not args.summary_only, args.refit_damps, args.refit_alphas)
    if args.plot:
        plot(rows, args.alphas, args.plot)


if __name__ == "__main__":
    main()

"""llc.py --calibrate: the sampler's epsilon x nbeta x gamma grid on a few checkpoints, as a table
and figures of every chain's per-draw LLC (matplotlib is imported only when it runs)."""
import json
import os

import numpy as np

import common
from sgld import AllChainsDivergedError


def calibrate(run, steps):
    """The epsilon x nbeta x gamma grid on a few checkpoints: <run>/llc_calibration.json (also
    printed) and one figure per (step, gamma) of every chain's per-draw LLC with its running mean.
    Healthy: running means that flatten, R-hat near 1, no diverged chains, an LLC that changes
    little when epsilon is halved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = run.cfg
    E, NB, GA = ([float(v) for v in cfg[k].split(",")]
                 for k in ("calib_epsilon", "calib_nbeta", "calib_gamma"))
    csteps = ([int(s) for s in cfg["calib_steps"].split(",")] if cfg["calib_steps"]
              else sorted({steps[min(1, len(steps) - 1)], steps[len(steps) // 2], steps[-1]}))
    table, fig_dir = [], os.path.join(run.dir, "llc_calibration")
    for step in csteps:
        for g in GA:
            fig, axes = plt.subplots(len(E), len(NB),
                                     figsize=(max(3.2 * len(NB), 6), 2.4 * len(E) + 0.6),
                                     squeeze=False)
            for (i, e), (j, nb) in ((ie, jn) for ie in enumerate(E) for jn in enumerate(NB)):
                ax, row = axes[i][j], dict(step=step, epsilon=e, nbeta=nb, gamma=g)
                try:
                    res = run.estimate(
                        [step], epsilon=e, nbeta=nb, gamma=g,
                        progress=f"calibrate step {step} eps={e} nbeta={nb} gamma={g}")[0]
                except AllChainsDivergedError:
                    row.update(llc_mean=None, error="all chains diverged")
                    ax.set_title(f"eps={e:g} nb={nb:g}: all diverged", fontsize=8)
                else:
                    row.update({k: res[k]
                                for k in ("llc_mean", "llc_std", "llc_se", "rhat", "nan_chains")})
                    # per-draw LLC, running mean bold
                    for k, r in enumerate(res["loss_trace"].numpy()):
                        llc_t = nb * (r - res["init_loss"])
                        ax.plot(llc_t, lw=0.5, alpha=0.4, color=f"C{k}")
                        ax.plot(np.cumsum(llc_t) / np.arange(1, len(llc_t) + 1), lw=1.5,
                                color=f"C{k}")
                    ax.set_title(f"eps={e:g} nb={nb:g}: "
                                 f"{res['llc_mean']:.1f}±{res['llc_se']:.1f}", fontsize=8)
                table.append({k: common.finite(v) for k, v in row.items()})
            fig.suptitle(f"step {step}, gamma={g:g}: nbeta*(L_t - L(w*)) per chain "
                         "(bold: running mean)", fontsize=9)
            fig.tight_layout()
            path = os.path.join(fig_dir, f"step_{step:07d}_gamma_{g:g}.png")
            os.makedirs(fig_dir, exist_ok=True)
            fig.savefig(path + ".tmp.png", dpi=80)
            os.replace(path + ".tmp.png", path)
            plt.close(fig)
    common.atomic_write(os.path.join(run.dir, "llc_calibration.json"), json.dumps(table, indent=1))
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    print(f"{'step':>8} {'eps':>8} {'nbeta':>7} {'gamma':>7} {'llc':>9} {'se':>7} {'std':>7} "
          f"{'rhat':>6} nan")
    for r in table:
        print(f"{r['step']:>8} {r['epsilon']:>8g} {r['nbeta']:>7g} {r['gamma']:>7g} "
              f"{fmt(r['llc_mean'], '9.2f')} {fmt(r.get('llc_se'), '7.2f')} "
              f"{fmt(r.get('llc_std'), '7.2f')} {fmt(r.get('rhat'), '6.3f')} "
              f"{len(r.get('nan_chains') or [])}")
    return table

"""bench.py's report: its results as Markdown text (the machine, the peak, the SGLD and training
tables with their ratios, the memory line)."""
import math


def of(v):
    """'k of n': a table row's diverged chains of all its chains."""
    return f"{v['diverged']} of {v['chains'] + v['diverged']}"


def diverged(v):
    """'; k of n chains diverged' for a row whose chains did (its mean is over the others)."""
    return f"; {of(v)} chains diverged" if v.get("diverged") else ""


def compare(k, ours, v):
    """ours - v in combined standard errors, where that means something: not where chains diverged,
    as then each mean is over whichever chains survived, a biased and different subset in each."""
    if ours.get("diverged") or v.get("diverged"):
        return (f"LLC ours - {k}: not compared, chains diverged (ours {of(ours)}, {k} {of(v)}): "
                "the survivors' means are biased (tune --epsilon, --gamma here, or use --ckpt)")
    z = (ours["mean"] - v["mean"]) / math.hypot(ours["se"], v["se"])
    return f"LLC ours - {k}: {ours['mean'] - v['mean']:+.2f} = {z:+.2f} combined standard errors"


def rate(fl, per_s, pk):
    """A FLOP rate, and its share of the peak pk (where known)."""
    r = fl * per_s
    return f"{r / 1e9:.1f} GFLOP/s" + (f" ({100 * r / pk:.0f}% of {pk / 1e9:.0f})" if pk else "")


def sgld_row(s, tab, v, name):
    """One sampler's row: its rate, the ratios at the same thread count, FLOPs and its LLC."""
    r, th, fl = v["chain_steps_per_s"], v["threads"], s["flops"][v["sampler"]]
    dv = tab.get(f"devinterp@{th}", {}).get("chain_steps_per_s")
    pl = tab[f"plain@{th}"]["chain_steps_per_s"]
    version = f" {v['version']}" if "version" in v else ""
    return (f"| {name}{version} | {th} | {r:.2f} | {f'{r / dv:.2f}x' if dv else '-'} | "
            f"{r / pl:.2f}x | {fl / 1e9:.2f} | {rate(fl, r, s['peaks'].get(th))} | "
            f"{v['mean']:.2f} ± {v['se']:.2f} ({v['std']:.2f}){diverged(v)} |")


def tf32_line(tf32, chains):
    """The estimate and throughput with TF32 matmuls against fp32, same seed."""
    f, t = tf32[False], tf32[True]
    z = (t["llc"] - f["llc"]) / math.hypot(t["se"], f["se"])
    gone = (f"; chains diverged: {t['diverged']} vs {f['diverged']} of {chains}"
            if t.get("diverged") or f.get("diverged") else "")
    return (f"TF32 matmuls (same seed): LLC {t['llc']:.2f} ± {t['se']:.2f} vs fp32 "
            f"{f['llc']:.2f} ± {f['se']:.2f} ({z:+.2f} combined se); "
            f"{t['chain_steps_per_s']:.1f} vs {f['chain_steps_per_s']:.1f} chain-steps/s{gone}")


def sgld_lines(s):
    """The SGLD section: settings, the sampler table, notes, LLC comparisons, TF32, chain modes."""
    st, tab = s["settings"], s["table"]
    L = [f"SGLD on an L2H4 checkpoint: {st['chains']} chains x ({st['burnin']} burn-in + "
         f"{st['draws']} draws) x {st['rounds']} round(s), batch {st['batch']}, fixed set of "
         f"{st['n']} sequences, eps {st['epsilon']:g}, gamma {st['gamma']:g}, nbeta "
         f"{st['nbeta']:g}; L(w*) = {s['L0']:.5f} (ours: {s['ours_L0']:.5f})", "",
         "| sampler | threads | chain-steps/s | vs devinterp (same threads) | vs plain loop "
         "| GFLOP per chain-step | FLOP rate (% of peak at those threads) "
         "| LLC mean ± se (chain std) |", "|---" * 8 + "|"]
    names = {"ours": f"ours (sgld.py, {s['ours_mode']})",
             "plain": "plain one-chain loop (nn.Module, autograd)", "devinterp": "devinterp"}
    L += [sgld_row(s, tab, v, names[v["sampler"]]) for v in tab.values()]
    L += [f"\n{note}" for note in dict.fromkeys(s["notes"])]
    L += ["\n" + compare(k, tab["ours@%d" % v["threads"]], v)
          for k, v in tab.items() if v["sampler"] != "ours"]
    if s.get("tf32"):
        L += ["", tf32_line(s["tf32"], st["chains"])]
    modes = ", ".join(f"{k} {v:.2f}" for k, v in s["modes"].items())
    return L + ["", f"Chain modes of ours (throughput only): {modes} chain-steps/s", ""]


def train_lines(t, peak):
    """The training table: each loop's steps/s against train.py as the paper's config runs it."""
    ref, fl = t["steps_per_s"][t["default"]], t["flops_per_step"]
    L = [f"Training, L2H4, batch {t['batch']}, {t['steps']} steps x {t['rounds']} round(s), "
         "interleaved:", "",
         "| loop | steps/s | vs train.py --fast_grad=auto | GFLOP per step | FLOP rate |",
         "|---" * 5 + "|"]
    L += [f"| {k} | {v:.2f} | {v / ref:.2f}x | {fl[k] / 1e9:.3f} | {rate(fl[k], v, peak)} |"
          for k, v in t["steps_per_s"].items()]
    return L + [""]


def report(results):
    """All sections measured, as one Markdown text."""
    L, peak = [f"Measured {results['machine']}", ""], results.get("peak")
    if peak:
        L += [f"fp32 matmul peak (best of 5 square matmuls): {peak / 1e9:.1f} GFLOP/s", ""]
    if "sgld" in results:
        L += sgld_lines(results["sgld"])
    if "train" in results:
        L += train_lines(results["train"], peak)
    if "memory" in results:
        m = results["memory"]
        L.append(f"Memory: llc.py sweep peak RSS {m['one_mb']:.0f} MB over 1 checkpoint, "
                 f"{m['many_mb']:.0f} MB over {m['checkpoints']}: ratio {m['ratio']:.3f} "
                 f"({m['settings']})")
    if "observe" in results:
        o = results["observe"]
        L.append(f"Susceptibilities: llc.py --probes={o['probes']} (--probe_rows={o['probe_rows']} "
                 f"--bif_rows={o['bif_rows']} --observe_every={o['every']}, chain_mode "
                 f"{o['mode']}): {o['ratio']:.2f}x the plain estimate's sampling time")
    return "\n".join(L)

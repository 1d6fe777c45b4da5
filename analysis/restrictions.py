"""llc.py's named restriction sets: which parameters (or elements of them) each refined LLC of a
set samples, mapped onto the model at hand, with what could not be mapped said, not dropped."""
import warnings

import torch

from common import ConfigError, select_params


def restriction_set(name, model, paper=None):
    """{restriction: estimate_llc settings} of a named set: 'heads' (L<i>H<h>: one attention head's
    weights, element masks from model.head_masks), 'layers' (L<i>: one block), 'paper' (the task's
    component restrictions, given as paper: {name: pattern}). Entries that match no parameter (a
    smaller or edited model) are left out and named in one warning; none matching: ConfigError."""
    shapes = {k: p.shape for k, p in model.named_parameters()}
    names = list(shapes)
    if name == "heads":  # model.head_masks must describe the (possibly edited) model's attention
        try:
            out = {f"L{i}H{h}": {"masks": model.head_masks(i, h)} for i in range(model.cfg.n_layer)
                   for h in range(model.cfg.n_head)}
            bad = [k for r in out.values() for k, m in r["masks"].items() if not (
                torch.is_tensor(m) and m.dtype == torch.bool and m.shape == shapes.get(k)
                and bool(m.any()))]
        except Exception as e:  # noqa: BLE001  an edited model: say what to update, no traceback
            bad = [f"{type(e).__name__}: {e}"]
        if bad:
            raise ConfigError(f"restrictions=heads: model.head_masks(layer, head) does not fit "
                              f"this model's parameters ({bad[0]}); update it in model.py after "
                              f"editing the attention")
        return out
    if name == "layers" or name == "paper" and paper:
        patterns = ({f"L{i}": f"blocks.{i}.**" for i in range(model.cfg.n_layer)}
                    if name == "layers" else paper)
        out, unmapped = {}, []
        for r, pattern in patterns.items():
            # a smaller model lacks some components, a fork may have renamed them: said, left out
            try:
                select_params(names, pattern)
                out[r] = {"include": pattern}
            except ValueError:
                unmapped.append(f"{r} ({pattern})")
        if not out:
            raise ConfigError(f"restrictions={name}: no restriction of the set matches this "
                              f"model's parameters (renamed modules in model.py?): "
                              f"{', '.join(names[:6])}, ...")
        if unmapped:
            warnings.warn(f"restrictions={name}: {len(unmapped)} of {len(patterns)} restrictions "
                          f"match no parameter of this model (a smaller or edited model.py) and "
                          f"are left out: {'; '.join(unmapped)}")
        return out
    raise ConfigError(f"restrictions must be heads, layers{', paper' if paper else ''} for this "
                      f"task; got {name!r}")

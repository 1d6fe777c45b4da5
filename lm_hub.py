"""Model-hub access: resumable, hash-checked downloads of the paper's published tokenizer, data shards and
checkpoints, and the TransformerLens <-> LMTransformer weight conversion that turns those checkpoints into a run
folder (language.md Part 2). Kept apart from lm_data.py because it is the only code that touches the network
and the only code that knows TransformerLens' parameter names.

    python lm_hub.py download datasets/georgeyw/dsir-pile-100k data/train-00000-of-00001.parquet
    python lm_hub.py import georgeyw/L2W256-3m-rr --steps=0,100,900 --out_dir=out/L2W256-paper \\
        --data_dir=data/python-v5000-ctx1024
"""
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch

import common

HUB_URL = os.environ.get("LM_HUB_URL", "https://huggingface.co")
HUB_CACHE = Path(os.environ.get("LM_HUB_CACHE", Path.home() / ".cache" / "icl-landscape" / "hub"))
PAPER_TOKENIZER = "georgeyw/TinyStories-tokenizer-5k"
PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "L2W256.py"


# ------------------------------------------------------------------------------------------ hub downloads
class HubError(RuntimeError):
    """A download that failed, was cut off, or does not match its expected size or hash."""


def hub_url(repo, filename, revision="main", base_url=None):
    """base_url/{repo}/resolve/{revision}/{filename}: the Hugging Face layout (datasets: repo 'datasets/o/n')."""
    return f"{(base_url or HUB_URL).rstrip('/')}/{repo}/resolve/{revision}/{filename}"


def hub_download(repo, filename, revision="main", *, base_url=None, cache_dir=None, sha256=None, size=None,
                 retries=3, timeout=60, chunk=1 << 16):
    """Fetch one file into the cache (cache_dir/repo/revision/filename) and return its path; a cached file is
    returned without network access. An interrupted transfer leaves <file>.part and is resumed with an HTTP
    Range request (here, up to `retries` times, or by the next call). The result must match `size` and
    `sha256` when given, and the server's ETag when it is a sha256 (as the hub sends for LFS files)."""
    import requests
    url = hub_url(repo, filename, revision, base_url)
    dest = Path(cache_dir or HUB_CACHE) / repo / revision / filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(dest) + ".part")
    total = remote_sha = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                              timeout=timeout) as r:
                if r.status_code == 416:  # nothing left to send: the partial file is already whole
                    total = int(r.headers.get("Content-Range", "*/-1").rpartition("/")[2])
                    break
                if r.status_code == 404:
                    raise HubError(f"{url}: not found (404); check the repository, file name and revision")
                if r.status_code not in (200, 206):
                    raise HubError(f"{url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    raise HubError(f"{url}: the server answered a resume from byte {have} with "
                                   f"Content-Range {r.headers.get('Content-Range')!r}")
                start = have if r.status_code == 206 else 0  # 200: the server ignored the range, start over
                if "Content-Range" in r.headers:
                    total = int(r.headers["Content-Range"].rpartition("/")[2])
                elif "Content-Length" in r.headers:
                    total = start + int(r.headers["Content-Length"])
                etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
                if re.fullmatch(r"[0-9a-f]{64}", etag):
                    remote_sha = etag
                with open(part, "r+b" if start else "wb") as f:
                    f.seek(start)
                    f.truncate()
                    for block in r.iter_content(chunk):
                        f.write(block)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            got = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise HubError(f"download of {url} was interrupted after {got:,} bytes ({e.__class__.__name__}); "
                               f"run again to resume from {part}") from e
            common.progress(f"download of {url} interrupted after {got:,} bytes; resuming")
    got = part.stat().st_size
    for want, what in ((total, "the server's length"), (size, "the expected size")):
        if want is not None and want >= 0 and got != want:
            part.unlink()
            raise HubError(f"{url}: got {got:,} bytes but {what} is {want:,}; the partial file was removed, retry")
    want_sha = sha256 or remote_sha
    if want_sha:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want_sha.lower():
            part.unlink()
            raise HubError(f"{url}: sha256 mismatch: expected {want_sha}, got {h.hexdigest()} "
                           f"({'given' if sha256 else 'server ETag'}); the corrupt download was removed, retry")
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------ the paper's checkpoints
def from_transformer_lens(sd):
    """A TransformerLens HookedTransformer state dict (the paper's checkpoint_*.pth) -> LMTransformer names."""
    out = {"embed.weight": sd["embed.W_E"], "pos_embed": sd["pos_embed.W_pos"],
           "ln_final.weight": sd["ln_final.w"], "ln_final.bias": sd["ln_final.b"],
           "unembed.weight": sd["unembed.W_U"].T, "unembed.bias": sd["unembed.b_U"]}
    i = 0
    while f"blocks.{i}.attn.W_Q" in sd:
        p = f"blocks.{i}."
        out[p + "ln.weight"], out[p + "ln.bias"] = sd[p + "ln1.w"], sd[p + "ln1.b"]
        for x in "QKV":  # (H, d, d_head) -> Linear weight (H*d_head, d)
            W = sd[p + f"attn.W_{x}"]
            out[p + f"attn.{x.lower()}.weight"] = W.permute(0, 2, 1).reshape(-1, W.shape[1])
            out[p + f"attn.{x.lower()}.bias"] = sd[p + f"attn.b_{x}"].reshape(-1)
        W_O = sd[p + "attn.W_O"]  # (H, d_head, d)
        out[p + "attn.o.weight"] = W_O.reshape(-1, W_O.shape[-1]).T
        out[p + "attn.o.bias"] = sd[p + "attn.b_O"]
        i += 1
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def to_transformer_lens(params, n_head):
    """The inverse of from_transformer_lens (for exporting, and for tests)."""
    d = params["embed.weight"].shape[1]
    sd = {"embed.W_E": params["embed.weight"], "pos_embed.W_pos": params["pos_embed"],
          "ln_final.w": params["ln_final.weight"], "ln_final.b": params["ln_final.bias"],
          "unembed.W_U": params["unembed.weight"].T, "unembed.b_U": params["unembed.bias"]}
    i = 0
    while f"blocks.{i}.ln.weight" in params:
        p = f"blocks.{i}."
        sd[p + "ln1.w"], sd[p + "ln1.b"] = params[p + "ln.weight"], params[p + "ln.bias"]
        for x in "QKV":
            sd[p + f"attn.W_{x}"] = params[p + f"attn.{x.lower()}.weight"].reshape(n_head, -1, d).permute(0, 2, 1)
            sd[p + f"attn.b_{x}"] = params[p + f"attn.{x.lower()}.bias"].reshape(n_head, -1)
        sd[p + "attn.W_O"] = params[p + "attn.o.weight"].T.reshape(n_head, -1, d)
        sd[p + "attn.b_O"] = params[p + "attn.o.bias"]
        i += 1
    return {k: v.contiguous() for k, v in sd.items()}


def import_checkpoints(repo, steps, out_dir, cfg, *, pattern="checkpoint_{step:07d}.pth", revision="main",
                       base_url=None, cache_dir=None, keep_download=False):
    """Download published TransformerLens checkpoints and convert each once into this project's run format
    (out_dir/config.json + checkpoints/step_*.safetensors), so llc.py and analyze.py read them like a run of
    train.py. The .pth files are opened with torch.load(weights_only=True): no pickled code runs."""
    from model import LMConfig, LMTransformer
    out_dir = Path(out_dir)
    common.atomic_write(out_dir / "config.json", json.dumps(cfg, indent=1))
    mcfg = common.model_config(cfg)
    assert isinstance(mcfg, LMConfig), "import_checkpoints needs an LM config (task = 'lm')"
    for step in steps:
        if step in common.list_checkpoints(out_dir):
            continue
        path = hub_download(repo, pattern.format(step=step), revision, base_url=base_url, cache_dir=cache_dir)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(sd, dict) and "embed.W_E" not in sd and key in sd:
                sd = sd[key]
        model = LMTransformer(mcfg)
        params = from_transformer_lens(sd)
        missing = set(dict(model.named_parameters())) ^ set(params)
        if missing:
            raise common.CheckpointError(f"{path} does not match the configured model: {sorted(missing)}")
        model.load_state_dict(params, strict=False)
        common.save_checkpoint(out_dir, step, model)
        if not keep_download:
            path.unlink()
        common.progress(f"imported step {step} -> {common.ckpt_path(out_dir, step)}")
    return out_dir


# --------------------------------------------------------------------------------------- command line
def main(argv):
    import argparse
    import train
    ap = argparse.ArgumentParser(prog="lm_hub.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, what in (("download", "fetch files from a model hub into the cache"),
                       ("import", "convert published TransformerLens checkpoints into a run folder")):
        p = sub.add_parser(name, help=what)
        p.add_argument("repo")
        p.add_argument("--revision", default="main")
        p.add_argument("--base_url", default=None, help=f"default {HUB_URL} (env LM_HUB_URL)")
        p.add_argument("--cache_dir", default=None, help=f"default {HUB_CACHE} (env LM_HUB_CACHE)")
    sub.choices["download"].add_argument("files", nargs="+")
    p = sub.choices["import"]
    p.add_argument("--steps", required=True, help="comma-separated, or start:stop:step")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--data_dir", default="", help="the LM data folder the run's evaluations should read")
    p.add_argument("--pattern", default="checkpoint_{step:07d}.pth")
    p.add_argument("--config", default=str(PAPER_CONFIG))
    a = ap.parse_args(argv)
    if a.cmd == "download":
        for f in a.files:
            print(hub_download(a.repo, f, a.revision, base_url=a.base_url, cache_dir=a.cache_dir))
    else:
        if ":" in a.steps:
            lo, hi, st = (int(x) for x in a.steps.split(":"))
            steps = list(range(lo, hi, st))
        else:
            steps = [int(s) for s in a.steps.split(",")]
        cfg = common.configure(train.DEFAULTS, [a.config, f"--out_dir={a.out_dir}", f"--data_dir={a.data_dir}"])
        import_checkpoints(a.repo, steps, a.out_dir, cfg, pattern=a.pattern, revision=a.revision,
                           base_url=a.base_url, cache_dir=a.cache_dir)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (HubError, FileNotFoundError, ValueError, RuntimeError) as e:  # ConfigError is a ValueError
        sys.exit(f"lm_hub.py: {e}")

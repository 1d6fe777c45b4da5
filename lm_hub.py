"""Model-hub access, the project's only network code: resumable, hash-checked downloads (the paper's tokenizer,
data shards, checkpoints) and the TransformerLens <-> LMTransformer state-dict conversion. Imports nothing from the
project. Usage: python lm_hub.py download <repo> <file> ... (`python lm_data.py import` makes a run folder)."""
import hashlib
import os
import re
import sys
import time
from pathlib import Path

HUB_URL = os.environ.get("LM_HUB_URL", "https://huggingface.co")
HUB_CACHE = Path(os.environ.get("LM_HUB_CACHE", Path.home() / ".cache" / "icl-landscape" / "hub"))
PAPER_TOKENIZER = "georgeyw/TinyStories-tokenizer-5k"


# ------------------------------------------------------------------------------------------ hub downloads
class HubError(RuntimeError):
    """A download that failed, was cut off, or does not match its expected size or hash."""


def hub_url(repo, filename, revision="main", base_url=None):
    """base_url/{repo}/resolve/{revision}/{filename}: the Hugging Face layout (datasets: repo 'datasets/o/n')."""
    return f"{(base_url or HUB_URL).rstrip('/')}/{repo}/resolve/{revision}/{filename}"


def hub_download(repo, filename, revision="main", *, base_url=None, cache_dir=None, sha256=None, size=None,
                 retries=3, timeout=60, chunk=1 << 16):
    """One file into the cache (cache_dir/repo/revision/filename), its path returned; a cached file needs no network.
    An interrupted transfer leaves <file>.part, resumed with a Range request (here or by the next call); the result
    must match `size` and `sha256` when given, and the server's ETag when it is a sha256."""
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
                    shown, t0 = time.time(), time.time()
                    for block in r.iter_content(chunk):
                        f.write(block)
                        if time.time() - shown >= 10:  # byte progress with rate and ETA
                            shown, done = time.time(), f.tell()
                            rate = (done - start) / (shown - t0)
                            left = f", ETA {(total - done) / rate:.0f}s" if total and rate > 0 else ""
                            print(f"{filename}: {done / 1e6:,.1f}/{(total or 0) / 1e6:,.1f} MB, {rate / 1e6:.2f} MB/s"
                                  f"{left}", file=sys.stderr, flush=True)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            got = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise HubError(f"download of {url} was interrupted after {got:,} bytes ({e.__class__.__name__}); "
                               f"run again to resume from {part}") from e
            print(f"download of {url} interrupted after {got:,} bytes; resuming", file=sys.stderr)
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


# ------------------------------------------------------------------- TransformerLens state dicts
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


# --------------------------------------------------------------------------------------- command line
def main(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="lm_hub.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("download", help="fetch files from a model hub into the cache")
    p.add_argument("repo")
    p.add_argument("files", nargs="+")
    p.add_argument("--revision", default="main")
    p.add_argument("--base_url", default=None, help=f"default {HUB_URL} (env LM_HUB_URL)")
    p.add_argument("--cache_dir", default=None, help=f"default {HUB_CACHE} (env LM_HUB_CACHE)")
    a = ap.parse_args(argv)
    for f in a.files:
        print(hub_download(a.repo, f, a.revision, base_url=a.base_url, cache_dir=a.cache_dir))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (HubError, OSError) as e:
        sys.exit(f"lm_hub.py: {e}")

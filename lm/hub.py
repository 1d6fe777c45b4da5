"""Model-hub access, the project's only network code: the paper's tokenizer, data and checkpoints,
through huggingface_hub when it is installed, else resumable hash-checked downloads into the same
cache; Arrow shards; TransformerLens state dicts and configs. Imports only common.py from the
project. Usage: see `python -m lm.hub --help`."""
import argparse
import gzip
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np

import common

PAPER = dict(  # the paper's files on the Hugging Face hub (README: how each name was confirmed)
    tokenizer=("georgeyw/TinyStories-tokenizer-5k", "tokenizer.json"),
    checkpoints=("georgeyw/L2W256-3m-rr", "checkpoints/checkpoint_{step:07d}.pth"),
    eval_data=("datasets/georgeyw/dsir-pile-100k", "train-100k.jsonl"),
    gpt2_vocab=("openai-community/gpt2", "vocab.json"),
)
PAPER_TOKENIZER = PAPER["tokenizer"][0]
PROGRESS_EVERY = 10.0  # seconds between byte-progress lines


# -------------------------------------------------------------------------- the hub's settings and
# cache
class HubError(OSError):
    """A download that failed, was cut off, or does not match the hub's size or hash: the
    environment's fault (an OSError: the scripts say so in one line, exit code 1)."""


class HubNotFound(HubError, common.ConfigError):
    """The hub has no such file (404): a checkpoint step that was never uploaded, or a wrong name (a
    usage error too: the scripts exit with code 2)."""


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hf_home():
    return (os.environ.get("HF_HOME")
            or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"))


def hub_cache():
    """huggingface_hub's cache folder: HF_HUB_CACHE, else $HF_HOME/hub (default
    ~/.cache/huggingface/hub)."""
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                or os.path.join(_hf_home(), "hub")).expanduser()


def offline():
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_token():
    """HF_TOKEN, else the token `huggingface-cli login` stored ($HF_TOKEN_PATH, default
    $HF_HOME/token)."""
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(_hf_home(), "token")).expanduser()
    return tok or (path.read_text().strip() if path.is_file() else None)


def split_repo(repo):
    """'datasets/o/n' -> ('o/n', 'dataset'); 'o/n' -> ('o/n', 'model')."""
    kind, _, rest = repo.partition("/")
    if kind in ("datasets", "spaces", "models") and rest.count("/") == 1:
        return rest, kind[:-1]
    return repo, "model"


def repo_folder(repo, cache_dir=None):
    repo_id, kind = split_repo(repo)
    return Path(cache_dir or hub_cache()) / "--".join([kind + "s", *repo_id.split("/")])


def hub_url(repo, filename, revision="main", base=None):
    """{endpoint}/{repo}/resolve/{revision}/{filename} (datasets: repo 'datasets/o/n')."""
    return f"{(base or endpoint()).rstrip('/')}/{repo}/resolve/{revision}/{filename}"


def cached_file(repo, filename, revision="main", cache_dir=None):
    """The cached copy (snapshots/<commit>/<filename>, the commit from refs/<revision>), or None."""
    folder = repo_folder(repo, cache_dir)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    path = folder / "snapshots" / commit / filename
    return path if path.is_file() else None


def forget(path):
    """Remove a cached file: its snapshot entry and the blob it links to."""
    path = Path(path)
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path.absolute():
        blob.unlink(missing_ok=True)


def _same_origin(a, b):
    return urlsplit(a)[:2] == urlsplit(b)[:2]


_PLAIN_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,255}")  # one path component, not . or ..


def _commit_name(value, url):
    """The server's X-Repo-Commit as one plain path component: a hostile endpoint's ../../x would
    put a link outside the cache. (An ETag that is no plain name is hashed into one instead.)"""
    if not _PLAIN_NAME.fullmatch(value):
        raise HubError(f"{url}: the server sent X-Repo-Commit {value!r}, which is not a plain "
                       "name; refusing to write outside the cache (check HF_ENDPOINT, --endpoint)")
    return value


def _inside(folder, path):
    """path, once checked to stay inside folder (file names and revisions are the caller's)."""
    top = os.path.abspath(folder)
    if os.path.commonpath([top, os.path.abspath(path)]) != top:
        raise HubError(f"{path} would lie outside the cache folder {folder}: check the file name "
                       "and revision")
    return path


def _problem(path, etag, size=None):
    """Why a file does not match the hub's size and hash (sha256, or a git blob's sha1), or None."""
    got = path.stat().st_size
    if size is not None and got != size:
        return f"got {got:,} bytes but the hub says {size:,}"
    hexed = re.fullmatch(r"[0-9a-f]+", etag or "")
    kind = {64: "sha256", 40: "git-sha1"}.get(len(etag)) if hexed else None
    if kind:
        h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % got)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != etag:
            return f"{kind} mismatch: the hub says {etag}, the file has {h.hexdigest()}"
    return None


def _progress(label, done, total, start, t0, end=""):
    rate = (done - start) / max(time.time() - t0, 1e-9)
    eta = f", ETA {(total - done) / rate:.0f}s" if total and rate > 0 and not end else ""
    print(f"{label}: {done / 1e6:,.1f}/{(total or done) / 1e6:,.1f} MB, "
          f"{rate / 1e6:.2f} MB/s{eta}{end}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# downloads
def hub_download(repo, filename, revision="main", *, base_url=None, cache_dir=None, backend=None,
                 retries=3, timeout=60):
    """One file of a hub repository, its cached path returned. backend (default env LM_HUB_BACKEND,
    else auto): huggingface_hub when installed, else requests. Both use its cache layout, token,
    endpoint and offline mode."""
    backend = backend or os.environ.get("LM_HUB_BACKEND", "auto")
    if backend == "auto":
        try:
            import huggingface_hub  # noqa: F401
            backend = "huggingface_hub"
        except ImportError:
            backend = "requests"
    fetch = {"huggingface_hub": _via_huggingface_hub, "requests": _via_requests}.get(backend)
    if fetch is None:
        raise HubError(f"unknown hub backend {backend!r} (auto, huggingface_hub, requests)")
    return fetch(repo, filename, revision, base_url or endpoint(), Path(cache_dir or hub_cache()),
                 retries, timeout)


def _via_huggingface_hub(repo, filename, revision, base, cache, retries, timeout):
    import huggingface_hub as hf
    repo_id, kind = split_repo(repo)
    kw = dict(repo_id=repo_id, filename=filename, repo_type=kind, revision=revision,
              cache_dir=str(cache))
    before = hf.try_to_load_from_cache(**kw)
    for attempt in range(retries + 1):
        try:
            path = Path(hf.hf_hub_download(**kw, endpoint=base, local_files_only=offline(),
                                           etag_timeout=timeout, force_download=attempt > 0))
        # huggingface_hub's own errors: 404s, misses offline, HTTP and connection failures
        except Exception as e:
            name = type(e).__name__
            status = getattr(getattr(e, "response", None), "status_code", None)
            if name == "LocalEntryNotFoundError":
                raise HubError(f"{repo}/{filename} is not in the cache {cache} and the hub cannot "
                               f"be reached (offline: {offline()}): {e}") from e
            if status == 404 and "Repository" not in name:
                url = hub_url(repo, filename, revision, base)
                raise HubNotFound(f"{url}: not found (404)") from e
            if attempt == retries or status in (401, 403, 404):
                raise HubError(f"{repo}/{filename}: {name}: {e}") from e
            continue
        if isinstance(before, str) and Path(before) == path:
            return path  # cached before this call: not read again
        problem = _problem(path.resolve(), path.resolve().name)
        if not problem:
            return path
        forget(path)
        print(f"{filename}: {problem}; fetching again", file=sys.stderr)
    raise HubError(f"{repo}/{filename}: {problem}; the download was removed, run again")


def _via_requests(repo, filename, revision, base, cache, retries, timeout):
    """HEAD the hub without following its redirect (the 302 carries X-Linked-Etag = sha256 and
    X-Linked-Size; the CDN's own ETag is not the file's hash), fetch blobs/<etag> from the Location,
    link snapshots/<commit>/<file>."""
    import requests
    folder, url = repo_folder(repo, cache), hub_url(repo, filename, revision, base)
    cached = cached_file(repo, filename, revision, cache)
    if offline():
        if cached:
            return cached
        raise HubError(f"{repo}/{filename} is not in the cache {cache} and HF_HUB_OFFLINE is set")
    auth = {"Authorization": f"Bearer {tok}"} if (tok := hub_token()) else {}
    try:
        # redirects on the hub itself (a renamed repository) are followed; one to a CDN is not
        for _ in range(5):
            r = requests.head(url, headers=auth, allow_redirects=False, timeout=timeout)
            if not (r.is_redirect and _same_origin(url, urljoin(url, r.headers["Location"]))):
                break
            url = urljoin(url, r.headers["Location"])
    except (requests.ConnectionError, requests.Timeout) as e:
        if cached:
            print(f"{url}: the hub cannot be reached ({e.__class__.__name__}); using {cached}",
                  file=sys.stderr)
            return cached
        raise HubError(f"{url}: the hub cannot be reached ({e})") from e
    if r.status_code == 404:
        raise HubNotFound(f"{url}: not found (404); check the repository, file name and revision")
    if r.status_code >= 400:
        gated = (" (a private or gated repository needs a token: HF_TOKEN)"
                 if r.status_code in (401, 403) else "")
        raise HubError(f"{url}: HTTP {r.status_code} {r.reason}{gated}")
    h = r.headers
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"')
    size = h.get("X-Linked-Size") or (None if r.is_redirect else h.get("Content-Length"))
    if size is not None and not size.isdigit():
        raise HubError(f"{url}: the server sent a size of {size!r} bytes")
    src = urljoin(url, h["Location"]) if r.is_redirect else url
    commit = _commit_name(h["X-Repo-Commit"], url) if h.get("X-Repo-Commit") else revision
    link = _inside(folder / "snapshots", folder / "snapshots" / commit / filename)
    plain = _PLAIN_NAME.fullmatch(etag)  # else a hash of it: never the server's ../../x
    name = etag if plain else hashlib.sha256((etag or src).encode()).hexdigest()
    blob = folder / "blobs" / name
    if not blob.is_file():
        _fetch(src, blob, etag, int(size) if size else None,
               auth if _same_origin(url, src) else {}, retries, timeout, filename)
    _link_snapshot(folder, blob, link, commit, revision)
    return link


def _link_snapshot(folder, blob, link, commit, revision):
    """snapshots/<commit>/<file> as a relative link to the blob (a copy where links fail), and
    refs/<revision> naming the commit."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, link.parent), tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, link)
    if commit != revision:
        ref = _inside(folder / "refs", folder / "refs" / revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


def _fetch(src, blob, etag, size, headers, retries, timeout, label):
    """src into blob via blob.incomplete, resumed with Range requests; checked against the hub's
    size and hash."""
    import requests
    part = blob.with_name(blob.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            resume = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(src, headers={**headers, **resume}, stream=True,
                              timeout=timeout) as r:
                if r.status_code not in (200, 206, 416):
                    raise HubError(f"{src}: HTTP {r.status_code} {r.reason}")
                if r.status_code != 416:  # 416: nothing left to send, the partial file is whole
                    # 200: the server ignored the range, start over
                    start = have if r.status_code == 206 else 0
                    if start and not (r.headers.get("Content-Range", "")
                                      .startswith(f"bytes {start}-")):
                        raise HubError(f"{src}: a resume from byte {start} was answered with "
                                       f"Content-Range {r.headers.get('Content-Range')!r}")
                    with open(part, "r+b" if start else "wb") as f:
                        f.seek(start)
                        f.truncate()
                        t0 = shown = time.time()
                        for block in r.iter_content(1 << 16):
                            f.write(block)
                            if time.time() - shown >= PROGRESS_EVERY:
                                shown = time.time()
                                _progress(label, f.tell(), size, start, t0)
                        _progress(label, f.tell(), size, start, t0, ", done")
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            got = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise HubError(f"download of {src} was interrupted after {got:,} bytes "
                               f"({e.__class__.__name__}); run again to resume from {part}") from e
            print(f"download of {src} interrupted after {got:,} bytes; resuming", file=sys.stderr)
            continue
        problem = _problem(part, etag, size)
        if not problem:
            os.replace(part, blob)
            return
        part.unlink()
        if attempt == retries:
            raise HubError(f"{src}: {problem}; the download was removed, run again")
        print(f"{label}: {problem}; fetching again", file=sys.stderr)


# -----------------------------------------------------------------------------------------------
# Arrow shards
def read_documents(path):
    """The documents of one file: a .txt/.md file is one; each row of a .jsonl(.gz), .parquet or
    .arrow shard is one, its text in column `contents` (the paper's DSIR-filtered Pile) or `text`,
    or a `tokens` row of ids."""
    p = Path(path)
    if p.suffix in (".txt", ".md"):
        return [p.read_text(encoding="utf-8", errors="replace")]
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz"
              else open(p, encoding="utf-8")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        bad = [sorted(r) for r in rows if "contents" not in r and "text" not in r]
        if bad:
            raise ValueError(f"{p}: a row has neither 'contents' nor 'text': keys {bad[0]}")
        return [r["contents"] if "contents" in r else r["text"] for r in rows]
    if p.suffix not in (".arrow", ".parquet"):
        return []
    docs = []
    for batch in read_arrow(p) if p.suffix == ".arrow" else [_parquet(p)]:
        col = next((batch[k] for k in ("contents", "text", "tokens") if k in batch), None)
        if col is None:
            raise ValueError(f"{p}: no column contents, text or tokens")
        docs += [x if isinstance(x, str) else np.asarray(x, np.uint16) for x in col]
    return docs


def _parquet(p):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError(f"{p}: reading parquet shards needs pyarrow "
                           "(pip install pyarrow)") from e
    return pq.read_table(p).to_pydict()


class _Table:
    """A flatbuffers table (Arrow's IPC metadata) inside buffer b at position pos."""

    def __init__(self, b, pos):
        self.b, self.pos = b, pos
        self.vt = pos - struct.unpack_from("<i", b, pos)[0]

    def _at(self, i):
        o = 4 + 2 * i
        inside = o < struct.unpack_from("<H", self.b, self.vt)[0]
        return struct.unpack_from("<H", self.b, self.vt + o)[0] if inside else 0

    def scalar(self, i, fmt, default=0):
        o = self._at(i)
        return struct.unpack_from(fmt, self.b, self.pos + o)[0] if o else default

    def _ref(self, i):
        p = self.pos + self._at(i)
        return p + struct.unpack_from("<I", self.b, p)[0]

    def table(self, i):
        return _Table(self.b, self._ref(i)) if self._at(i) else None

    def vector(self, i):  # (start of the elements, count)
        if not self._at(i):
            return 0, 0
        p = self._ref(i)
        return p + 4, struct.unpack_from("<I", self.b, p)[0]

    def tables(self, i):
        start, n = self.vector(i)
        return [_Table(self.b, start + 4 * k + struct.unpack_from("<I", self.b, start + 4 * k)[0])
                for k in range(n)]

    def string(self, i):
        start, n = self.vector(i)
        return bytes(self.b[start:start + n]).decode()


# Arrow type id -> buffers (else 2)
_BUFFERS = {1: 0, 4: 3, 5: 3, 12: 2, 13: 1, 16: 1, 17: 2, 19: 3, 20: 3, 21: 2}


def _field(t):  # name, type id, an integer's bit width, children
    kind = t.scalar(2, "<B")
    return dict(name=t.string(0), type=kind, bits=t.table(3).scalar(0, "<i") if kind == 2 else 0,
                children=[_field(c) for c in t.tables(5)])


def read_arrow(path, columns=("contents", "text", "tokens")):
    """Record batches of an Arrow IPC stream or file (datasets' .arrow shards) as {column: values}:
    string columns as lists of str, list<int> columns as lists of int arrays. Uncompressed data
    only; no pyarrow needed."""
    with (open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
          memoryview(m) as b):
        pos, fields = 8 if m[:6] == b"ARROW1" else 0, None
        while pos + 8 <= len(b):
            n = struct.unpack_from("<I", b, pos)[0]
            pos, n = ((pos + 8, struct.unpack_from("<i", b, pos + 4)[0]) if n == 0xFFFFFFFF
                      else (pos + 4, n))
            if n == 0:
                break
            msg = _Table(b, pos + struct.unpack_from("<I", b, pos)[0])
            body, pos = pos + n, pos + n + msg.scalar(3, "<q")
            if msg.scalar(1, "<B") == 1:  # Schema
                fields = [_field(t) for t in msg.table(2).tables(1)]
            elif msg.scalar(1, "<B") == 3:  # RecordBatch
                yield _batch(b, body, msg.table(2), fields, columns)


def _batch(b, body, rb, fields, columns):
    if rb.table(3) is not None:
        raise ValueError("compressed Arrow record batches are not supported")
    start, _ = rb.vector(2)
    bufs = iter(struct.unpack_from("<qq", b, start + 16 * k) for k in range(rb.vector(2)[1]))
    n, out = rb.scalar(0, "<q"), {}

    def take(f):  # this field's buffers (pre-order, as Arrow lays them out): (offset, length) pairs
        mine = [next(bufs) for _ in range(_BUFFERS.get(f["type"], 2))]
        return mine, [take(c) for c in f["children"]]

    def arr(off_len, dtype):
        return np.frombuffer(b, dtype, off_len[1] // np.dtype(dtype).itemsize, body + off_len[0])
    for f in fields:
        own, kids = take(f)
        if f["name"] not in columns:
            continue
        if f["type"] in (5, 20):  # utf8, large utf8
            o, data = arr(own[1], "<i4" if f["type"] == 5 else "<i8"), bytes(arr(own[2], "u1"))
            out[f["name"]] = [data[o[i]:o[i + 1]].decode() for i in range(n)]
        elif f["type"] in (12, 21) and f["children"][0]["type"] == 2:  # list / large list of int
            o = arr(own[1], "<i4" if f["type"] == 12 else "<i8")
            # the file's pages stay unpinned
            vals = arr(kids[0][0][1], f"<i{f['children'][0]['bits'] // 8}").copy()
            out[f["name"]] = [vals[o[i]:o[i + 1]] for i in range(n)]
    return out


# -----------------------------------------------------------------------------------------
# TransformerLens
def transformer_lens_config(cfg):
    """HookedTransformerConfig arguments for a run config: attention-only, LayerNorm, shortformer
    positions."""
    return dict(n_layers=cfg["n_layer"], d_model=cfg["d_model"], n_ctx=cfg["n_ctx"],
                n_heads=cfg["n_head"], d_head=cfg["d_model"] // cfg["n_head"],
                d_vocab=cfg["vocab_size"], attn_only=True, normalization_type="LN",
                positional_embedding_type="shortformer", seed=cfg.get("seed"))


def hooked_transformer(sd, tl_cfg):
    """A transformer_lens.HookedTransformer holding state dict `sd` (strict load); needs
    transformer-lens."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    model = HookedTransformer(HookedTransformerConfig(**tl_cfg))
    model.load_state_dict(sd, strict=True)
    return model


def from_transformer_lens(sd):
    """A HookedTransformer or its state dict (the paper's checkpoint_*.pth) -> LMTransformer
    parameter names."""
    sd = sd.state_dict() if hasattr(sd, "state_dict") else sd
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
    """The inverse of from_transformer_lens, with TransformerLens' persistent buffers (attn.mask,
    attn.IGNORE), so that HookedTransformer.load_state_dict(strict=True) accepts it."""
    import torch
    d, n_ctx = params["embed.weight"].shape[1], params["pos_embed"].shape[0]
    sd = {"embed.W_E": params["embed.weight"], "pos_embed.W_pos": params["pos_embed"],
          "ln_final.w": params["ln_final.weight"], "ln_final.b": params["ln_final.bias"],
          "unembed.W_U": params["unembed.weight"].T, "unembed.b_U": params["unembed.bias"]}
    i = 0
    while f"blocks.{i}.ln.weight" in params:
        p = f"blocks.{i}."
        sd[p + "ln1.w"], sd[p + "ln1.b"] = params[p + "ln.weight"], params[p + "ln.bias"]
        for x in "QKV":
            W = params[p + f"attn.{x.lower()}.weight"]
            sd[p + f"attn.W_{x}"] = W.reshape(n_head, -1, d).permute(0, 2, 1)
            sd[p + f"attn.b_{x}"] = params[p + f"attn.{x.lower()}.bias"].reshape(n_head, -1)
        sd[p + "attn.W_O"] = params[p + "attn.o.weight"].T.reshape(n_head, -1, d)
        sd[p + "attn.b_O"] = params[p + "attn.o.bias"]
        sd[p + "attn.mask"] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
        sd[p + "attn.IGNORE"] = torch.tensor(-torch.inf)
        i += 1
    return {k: v.contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------- command
# line
class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit code 2, as in the project's
    other scripts."""

    def error(self, message):
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv):
    ap = Parser(prog="python -m lm.hub",
                description=__doc__.split("Usage")[0] + "\n\nThe paper's files: "
                + "; ".join(f"{r} {f}" for r, f in PAPER.values()))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("download", help="fetch files of a hub repository into the hub cache; "
                                        "print their paths")
    p.add_argument("repo", help="owner/name, or datasets/owner/name")
    p.add_argument("files", nargs="+")
    p.add_argument("--revision", default="main")
    p.add_argument("--endpoint", default=None,
                   help="default $HF_ENDPOINT or https://huggingface.co")
    p.add_argument("--cache_dir", default=None,
                   help="default $HF_HUB_CACHE or ~/.cache/huggingface/hub")
    p.add_argument("--backend", default=None, choices=("auto", "huggingface_hub", "requests"))
    p.add_argument("--link_dir", default=None,
                   help="also link each file here (e.g. a corpus folder)")
    a = ap.parse_args(argv)
    for f in a.files:
        path = hub_download(a.repo, f, a.revision, base_url=a.endpoint, cache_dir=a.cache_dir,
                            backend=a.backend)
        if a.link_dir:
            Path(a.link_dir).mkdir(parents=True, exist_ok=True)
            (Path(a.link_dir) / Path(f).name).unlink(missing_ok=True)
            (Path(a.link_dir) / Path(f).name).symlink_to(path.resolve())
        print(path)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (HubError, OSError) as e:
        sys.exit(f"lm.hub: {e}")

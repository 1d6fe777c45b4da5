"""The language-model half: model, tokenizer and packed data, hub downloads, evaluations, training.
"""
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

import common
import data
import lm.data as lm_data
import lm.eval as lm_eval
import lm.hub as lm_hub
import train
from conftest import ROOT
from lm.model import LMConfig, LMTransformer

LM_DEFAULTS = train.defaults_for("lm")  # train.py's options of an LM run

TINY = LMConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, d_model=8)
CTX = 64  # packed row length of the test corpus


# ------------------------------------------------------------------------------------------------
# model
def test_parameter_count_and_init():
    m = LMConfig().build(1)
    assert sum(p.numel() for p in m.parameters()) == 3_355_016
    p = dict(m.named_parameters())
    for name in ("embed.weight", "pos_embed", "blocks.0.attn.q.weight", "blocks.1.attn.o.weight",
                 "unembed.weight"):
        assert p[name].std().item() == pytest.approx(0.05, rel=0.02), name
    assert p["unembed.bias"].abs().max() == 0 and p["blocks.0.attn.v.bias"].abs().max() == 0
    assert (torch.equal(p["blocks.1.ln.weight"], torch.ones(256))
            and torch.equal(p["ln_final.bias"], torch.zeros(256)))


def test_shortformer_positions_never_enter_the_residual_stream():
    torch.manual_seed(0)
    m = TINY.build(0)
    tokens = torch.randint(0, 50, (3, 16))

    def with_positions(model, scale):
        c = LMTransformer(TINY)
        c.load_state_dict(model.state_dict())
        with torch.no_grad():
            c.pos_embed.mul_(scale)
        return c(tokens)

    # 1. no attention output: the stream is the token embedding alone, whatever the position table
    #    holds
    with torch.no_grad():
        for b in m.blocks:
            b.attn.o.weight.zero_()
            b.attn.o.bias.zero_()
    seen = {}
    m.ln_final.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    m(tokens)
    torch.testing.assert_close(seen["x"], m.embed(tokens))
    torch.testing.assert_close(with_positions(m, 0.0), with_positions(m, 50.0))
    # 2. uniform attention (q = k = 0): positions only reach the scores, so they cannot change the
    #    output
    m = TINY.build(1)
    with torch.no_grad():
        for b in m.blocks:
            for lin in (b.attn.q, b.attn.k):
                lin.weight.zero_()
                lin.bias.zero_()
    torch.testing.assert_close(with_positions(m, 0.0), with_positions(m, 50.0))
    # 3. and with normal weights they do matter (through the queries and keys)
    m = TINY.build(2)
    assert not torch.allclose(with_positions(m, 0.0), with_positions(m, 50.0))
    torch.testing.assert_close(m(tokens, positions=False), with_positions(m, 0.0))


def test_causal():
    m = TINY.build(3)
    a = torch.randint(0, 50, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(m(a)[:, :9], m(b)[:, :9])
    assert not torch.allclose(m(a)[:, 9:], m(b)[:, 9:])
    _, patterns = m(a, return_attention=True)
    assert len(patterns) == 2 and patterns[0].shape == (2, 2, 16, 16)
    assert patterns[1].triu(1).abs().max() == 0
    torch.testing.assert_close(patterns[0].sum(-1), torch.ones(2, 2, 16))


def test_vmap_over_stacked_models_and_the_task_loss():
    """What llc.py does: vmap(grad(loss of functional_call)) over chains equals a loop over models.
    """
    models = [TINY.build(s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = LMTransformer(TINY).to("meta")
    x = torch.randint(0, 50, (3, 4, 15))
    y = torch.randint(0, 50, (3, 4, 15))

    def loss(p, b, xs, ys):
        return lm_data.LMTask.loss(
            functional_call(base, (p, b), (lm_data.LMTask.model_input(xs, ys),)), ys)

    grads = vmap(grad(loss))(params, buffers, x, y)
    for i, m in enumerate(models):
        m.zero_grad()
        lm_data.LMTask.loss(m(x[i]), y[i]).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, atol=1e-5, rtol=1e-4)
    per_tok = lm_data.LMTask.loss_per_token(models[0](x[0]), y[0])
    assert per_tok.shape == (15,)
    torch.testing.assert_close(per_tok.mean(), lm_data.LMTask.loss(models[0](x[0]), y[0]))


def _transformer_lens_forward(sd, tokens, n_head):
    """A separate reading of TransformerLens' attention-only shortformer model, on its own state
    dict."""
    T = tokens.shape[1]
    ln = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)  # noqa: E731
    x, pos = sd["embed.W_E"][tokens], sd["pos_embed.W_pos"][:T]
    i = 0
    while f"blocks.{i}.attn.W_Q" in sd:
        p = f"blocks.{i}."
        h = ln(x, sd[p + "ln1.w"], sd[p + "ln1.b"])
        q = torch.einsum("btd,hde->bthe", h + pos, sd[p + "attn.W_Q"]) + sd[p + "attn.b_Q"]
        k = torch.einsum("btd,hde->bthe", h + pos, sd[p + "attn.W_K"]) + sd[p + "attn.b_K"]
        v = torch.einsum("btd,hde->bthe", h, sd[p + "attn.W_V"]) + sd[p + "attn.b_V"]
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        z = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
        x = x + torch.einsum("bqhe,hed->bqd", z, sd[p + "attn.W_O"]) + sd[p + "attn.b_O"]
        i += 1
    return ln(x, sd["ln_final.w"], sd["ln_final.b"]) @ sd["unembed.W_U"] + sd["unembed.b_U"]


def test_transformer_lens_state_dict_conversion():
    m = TINY.build(4)
    with torch.no_grad():  # non-trivial biases and LayerNorms
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()
    params = {k: v.detach() for k, v in m.named_parameters()}
    sd = lm_hub.to_transformer_lens(params, TINY.n_head)
    assert sd["blocks.0.attn.W_Q"].shape == (2, 8, 4) and sd["blocks.0.attn.W_O"].shape == (2, 4, 8)
    back = lm_hub.from_transformer_lens(sd)
    assert back.keys() == params.keys() and all(torch.equal(back[k], params[k]) for k in params)
    tokens = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(m(tokens), _transformer_lens_forward(sd, tokens, 2), atol=1e-5,
                               rtol=1e-5)


# -------------------------------------------------------------------------------- tokenizer and
# packing
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """The default corpus (CPython's docs), prepared once for these tests with rows of 64 tokens."""
    d = tmp_path_factory.mktemp("lmdata") / "python-v5000-ctx64"
    lm_data.prepare(d, "python", 5000, CTX, 0.05, "train", progress=lambda msg: None)
    return d


def test_tokenizer_round_trip_and_special_ids(lm_dir):
    tok = lm_data.load_tokenizer(lm_dir / "tokenizer.json")
    assert (tok.get_vocab_size() == 5000 and tok.token_to_id("<|endoftext|>") == 4999
            and tok.token_to_id("Ġ") == 220)
    docs = lm_data.python_docs_corpus()
    for doc in docs[::7]:
        assert tok.decode(tok.encode(doc).ids) == doc
    meta = lm_data.read_meta(lm_dir)
    assert meta["bos"] == meta["eos"] == 4999 and meta["space_id"] == 220
    assert 3.0 < meta["splits"]["train"]["chars"] / meta["splits"]["train"]["tokens"] < 5.0


def test_packed_files_and_held_out_split(lm_dir):
    meta = lm_data.read_meta(lm_dir)
    train_rows, test_rows = lm_data.open_rows(lm_dir, "train"), lm_data.open_rows(lm_dir, "test")
    for rows, split in ((train_rows, "train"), (test_rows, "test")):
        assert rows.dtype == np.uint16 and rows.shape == (meta["splits"][split]["rows"], CTX)
        assert (lm_dir / f"{split}.bin").stat().st_size == rows.size * 2
        assert (rows[:, 0] == 4999).all()
    # the rows are the documents' tokens joined by EOS, in order, cut every 63 tokens
    docs = lm_data.python_docs_corpus()
    tok = lm_data.load_tokenizer(lm_dir / "tokenizer.json")
    train_ids, test_ids = lm_data.split_documents(docs, 0.05, 0)
    assert test_ids == meta["test_doc_ids"] and not set(train_ids) & set(test_ids)
    assert sorted(train_ids + test_ids) == list(range(len(docs)))
    stream = np.concatenate([np.append(tok.encode(docs[i]).ids, 4999) for i in test_ids])
    np.testing.assert_array_equal(np.asarray(test_rows[:, 1:]).ravel(),
                                  stream[:test_rows.shape[0] * (CTX - 1)])
    first = np.concatenate([np.append(tok.encode(docs[i]).ids, 4999) for i in train_ids[:5]])
    n = len(first) // (CTX - 1) * (CTX - 1)
    np.testing.assert_array_equal(np.asarray(train_rows[:, 1:]).ravel()[:n], first[:n])
    held = {r.tobytes() for r in np.asarray(test_rows)}
    assert not any(r.tobytes() in held for r in np.asarray(train_rows))
    # unigram entropy as recorded, and a reused folder with other settings is refused
    assert meta["unigram_entropy"] == pytest.approx(lm_data.unigram_entropy(train_rows, 5000))
    with pytest.raises(common.ConfigError, match="other settings"):
        lm_data.prepare(lm_dir, "python", 5000, 128, 0.05, "train")


def test_other_corpora(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b" / "c.md").write_text("second")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"contents": "a pile row"}) + "\n"
                + json.dumps({"text": "another"}) + "\n")
    assert lm_data.load_corpus(str(tmp_path)) == ["first document", "second", "a pile row",
                                                  "another"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm_data.load_corpus(str(tmp_path / "nowhere"))
    if shutil.which("bible"):  # Debian's bible-kjv is installed here
        kjv = lm_data.load_corpus("kjv")
        assert (len(kjv) == 1189
                and kjv[0].startswith("In the beginning God created the heaven and the earth."))


def test_python_source_corpus_mixes_code_and_prose():
    """The whole standard-library source (tests included) after the manual's topics: the docs
    corpus' topics come first, and the files are code with their prose (docstrings, comments)."""
    docs, prose = lm_data.load_corpus("python-source"), lm_data.python_docs_corpus()
    import pydoc_data.topics as topics
    n = len(topics.topics)
    assert docs[:n] == prose[:n] and len(docs) > n + 1000
    code = docs[n:]
    assert sum(map(len, code)) > 20e6  # characters (CPython 3.11: about 29 million)
    assert any("def __init__(self" in d and '"""' in d for d in code)
    assert sum(d.count("\n#") for d in code) > 5_000  # lines that begin with a comment


def test_lm_task_interface(lm_dir):
    task = lm_data.LMTask(lm_dir)
    g = torch.Generator().manual_seed(0)
    xs, ys = task.sample(g, 5)
    assert (xs.shape == ys.shape == (5, CTX - 1) and xs.dtype == torch.long
            and (xs[:, 0] == 4999).all())
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(task.sample(g2, 5)[0], xs)
    assert torch.equal(xs[:, 1:], ys[:, :-1])
    with pytest.raises(common.ConfigError, match="n_ctx=64, but the run has n_ctx=128"):
        lm_data.LMTask(lm_dir, n_ctx=128)
    rows = task.eval_data(0, 7)
    assert torch.equal(rows, torch.from_numpy(np.asarray(task.test[:7]).astype(np.int64)))
    m = LMConfig(n_ctx=CTX, d_model=16, n_head=2).build(0)
    assert task.loss(m(task.model_input(xs, ys)), ys).item() == pytest.approx(math.log(5000),
                                                                              abs=0.6)
    row = task.metrics(m, rows)
    assert {"loss", "loss/0", "loss/50", "loss_pos_ablated", "icl", "weight_norm"} <= set(row)
    assert "loss/100" not in row  # beyond the 63 predicted positions


# ---------------------------------------------------------------------------------------------- the
# hub
class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub and its CDN on two loopback servers: /resolve/ answers a 302 with X-Linked-Etag,
    X-Linked-Size and X-Repo-Commit (or a 404); the CDN serves /cdn/<sha256> with ranges and a
    sha256-like ETag that is not the file's. corrupt / cut: sha256s whose next CDN GET is damaged /
    stops halfway."""
    files, corrupt, cut, log, cdn, commit = {}, set(), set(), [], "", "c0" * 20

    def do_HEAD(self):
        self._answer()

    def do_GET(self):
        self._answer()

    def _answer(self):
        self.log.append((self.command, self.path, self.headers.get("Range"),
                         self.headers.get("Authorization")))
        body = self.files.get(self.path)
        if "/resolve/" in self.path:
            sha = body and hashlib.sha256(body).hexdigest()
            self.send_response(302 if body else 404)
            head = {"Location": f"{self.cdn}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": len(body),
                    "ETag": '"hub"'} if body else {"X-Error-Code": "EntryNotFound"}
            for k, v in {**head, "X-Repo-Commit": self.commit, "Content-Length": 0}.items():
                self.send_header(k, str(v))
            self.end_headers()
            return
        sha = self.path.rpartition("/")[2]
        body = next((b for b in self.files.values() if hashlib.sha256(b).hexdigest() == sha), None)
        if body is None or not self.path.startswith("/cdn/"):
            self.send_error(404)
            return
        if self.command == "GET" and sha in self.corrupt:
            self.corrupt.discard(sha)
            body = bytes(255 - x for x in body[:64]) + body[64:]  # same length, other bytes
        start = int((self.headers.get("Range") or "bytes=0-")[6:].split("-")[0])
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", f'"{hashlib.sha256(b"cdn" + body).hexdigest()}"')
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.command == "GET" and sha in self.cut:
            self.cut.discard(sha)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """(handler class, hub URL, cache folder); the requests backend, online, no token, unless a test
    says otherwise."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("LM_HUB_BACKEND", "requests")
    _Hub.files, _Hub.corrupt, _Hub.cut, _Hub.log = {}, set(), set(), []
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    _Hub.cdn = f"http://127.0.0.1:{servers[1].server_address[1]}"
    yield _Hub, f"http://127.0.0.1:{servers[0].server_address[1]}", tmp_path / "cache"
    for s in servers:
        s.shutdown()
        s.server_close()


def _put(H, repo, name, body, rev="main"):
    H.files[f"/{repo}/resolve/{rev}/{name}"] = body
    return hashlib.sha256(body).hexdigest()


def test_hub_download_reads_the_redirect_and_uses_the_hub_cache_layout(hub, monkeypatch):
    H, url, cache = hub
    blob = np.random.default_rng(0).bytes(100_000)
    sha = _put(H, "o/L2", "checkpoints/checkpoint_0000000.pth", blob)
    # noqa: E731
    get = lambda name, **kw: lm_hub.hub_download("o/L2", name, base_url=url, cache_dir=cache, **kw)
    # a good file is accepted although the CDN's ETag looks like a sha256: the 302's X-Linked-Etag
    # is the hash. Without huggingface_hub (as on a clean CI machine) the automatic choice is this
    # requests path.
    monkeypatch.setenv("LM_HUB_BACKEND", "auto")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    path = get("checkpoints/checkpoint_0000000.pth")
    folder = cache / "models--o--L2"
    assert (path == folder / "snapshots" / H.commit / "checkpoints/checkpoint_0000000.pth"
            and path.read_bytes() == blob)
    assert (path.resolve() == (folder / "blobs" / sha).resolve()
            and (folder / "refs/main").read_text() == H.commit)
    assert [(m, p) for m, p, _, _ in H.log] == [
        ("HEAD", "/o/L2/resolve/main/checkpoints/checkpoint_0000000.pth"), ("GET", f"/cdn/{sha}")]
    # cached: a HEAD checks for a newer version, nothing is fetched; offline: no request at all
    assert (get("checkpoints/checkpoint_0000000.pth") == path
            and [m for m, *_ in H.log[2:]] == ["HEAD"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert get("checkpoints/checkpoint_0000000.pth") == path and len(H.log) == 3
    with pytest.raises(lm_hub.HubError, match="not in the cache"):
        get("losses.txt")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # a new version under `main` replaces the cached one; the token goes to the hub, never to the
    # CDN
    monkeypatch.setenv("HF_TOKEN", "secret")
    new = _put(H, "o/L2", "checkpoints/checkpoint_0000000.pth", blob[::-1])
    assert get("checkpoints/checkpoint_0000000.pth").read_bytes() == blob[::-1]
    assert [(m, p, a) for m, p, _, a in H.log[3:]] == [
        ("HEAD", "/o/L2/resolve/main/checkpoints/checkpoint_0000000.pth", "Bearer secret"),
        ("GET", f"/cdn/{new}", None)]
    with pytest.raises(lm_hub.HubNotFound, match="404"):
        get("checkpoints/checkpoint_0000100.pth")
    # datasets live under datasets--owner--name
    _put(H, "datasets/o/pile", "train-100k.jsonl", b'{"contents": "a"}\n')
    got = lm_hub.hub_download("datasets/o/pile", "train-100k.jsonl", base_url=url, cache_dir=cache)
    assert got.parent == cache / "datasets--o--pile" / "snapshots" / H.commit


def test_hub_download_rejects_corrupt_files_and_resumes_partial_ones(hub):
    H, url, cache = hub
    blob = np.random.default_rng(1).bytes(300_000)
    sha = _put(H, "o/tok", "tokenizer.json", blob)
    # noqa
    get = lambda **kw: lm_hub.hub_download("o/tok", "tokenizer.json", base_url=url, cache_dir=cache,
                                           **kw)
    # a corrupt transfer (right length, wrong bytes) is rejected, removed and fetched again
    H.corrupt.add(sha)
    with pytest.raises(lm_hub.HubError, match="sha256 mismatch.*removed"):
        get(retries=0)
    assert not list(cache.rglob(f"{sha}*"))
    H.corrupt.add(sha)
    assert (get().read_bytes() == blob
            and [m for m, p, _, _ in H.log if p.startswith("/cdn/")] == ["GET"] * 3)
    # an interrupted transfer leaves blobs/<sha>.incomplete; the next call resumes it with a Range
    # request
    blob2 = blob[::-1]
    sha2 = _put(H, "o/tok", "vocab.json", blob2)
    H.cut.add(sha2)
    with pytest.raises(lm_hub.HubError, match="interrupted after .* bytes.*run again to resume"):
        lm_hub.hub_download("o/tok", "vocab.json", base_url=url, cache_dir=cache, retries=0)
    part = cache / "models--o--tok" / "blobs" / f"{sha2}.incomplete"
    have = part.stat().st_size
    assert 0 < have <= 150_000 and part.read_bytes() == blob2[:have]
    path = lm_hub.hub_download("o/tok", "vocab.json", base_url=url, cache_dir=cache)
    assert (path.read_bytes() == blob2 and not part.exists()
            and H.log[-1][1:3] == (f"/cdn/{sha2}", f"bytes={have}-"))
    # ... and within one call (retries)
    blob3 = blob[:200_000]
    H.cut.add(_put(H, "o/tok", "merges.txt", blob3))
    assert lm_hub.hub_download("o/tok", "merges.txt", base_url=url,
                               cache_dir=cache).read_bytes() == blob3
    assert H.log[-1][2].startswith("bytes=")


def test_hub_download_through_huggingface_hub_shares_the_cache(hub, monkeypatch):
    pytest.importorskip("huggingface_hub")
    H, url, cache = hub
    a, b = np.random.default_rng(2).bytes(50_000), np.random.default_rng(3).bytes(40_000)
    sha_a, _ = (_put(H, "o/L2", "checkpoints/checkpoint_0000000.pth", a),
                _put(H, "o/L2", "losses.txt", b))
    # caught by our sha256 check (huggingface_hub checks only the length) and fetched again
    H.corrupt.add(sha_a)
    got = lm_hub.hub_download("o/L2", "checkpoints/checkpoint_0000000.pth", base_url=url,
                              cache_dir=cache, backend="huggingface_hub")
    assert got.read_bytes() == a and got.resolve().name == sha_a
    assert [p for m, p, _, _ in H.log if m == "GET"] == [f"/cdn/{sha_a}"] * 2
    via_requests = lm_hub.hub_download("o/L2", "losses.txt", base_url=url, cache_dir=cache)
    with pytest.raises(lm_hub.HubNotFound):
        lm_hub.hub_download("o/L2", "checkpoints/checkpoint_0000100.pth", base_url=url,
                            cache_dir=cache, backend="huggingface_hub")
    # offline, each backend finds what the other one downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(H.log)
    assert lm_hub.hub_download("o/L2", "checkpoints/checkpoint_0000000.pth", cache_dir=cache) == got
    assert lm_hub.hub_download("o/L2", "losses.txt", cache_dir=cache,
                               backend="huggingface_hub") == via_requests
    assert len(H.log) == n


def _tl_bytes(model, wrap=False):
    buf = io.BytesIO()
    sd = lm_hub.to_transformer_lens({k: v.detach() for k, v in model.named_parameters()},
                                    model.cfg.n_head)
    torch.save({"model": sd} if wrap else sd, buf)
    return buf.getvalue()


def test_import_skips_missing_steps_and_export_round_trips(hub, tmp_path, lm_dir):
    """The paper's layout (checkpoints/checkpoint_*.pth) becomes a run folder; a step the hub lacks
    is skipped and reported; `export` writes the same layout with a config, and `import` reads that
    folder back."""
    H, url, cache = hub
    cfg = common.configure(LM_DEFAULTS, [str(ROOT / "configs" / "L2W256.py"),
                                         f"--out_dir={tmp_path / 'run'}", f"--data_dir={lm_dir}",
                                         f"--n_ctx={CTX}", "--d_model=16", "--n_head=2"])
    models = {s: data.build_model(cfg, s) for s in (0, 200)}
    for s, m in models.items():
        _put(H, "o/L2", f"checkpoints/checkpoint_{s:07d}.pth", _tl_bytes(m, wrap=s == 200))
    kept = lm_hub.hub_download("o/L2", "checkpoints/checkpoint_0000000.pth", base_url=url,
                               cache_dir=cache)
    done, missing = lm_data.import_checkpoints("o/L2", [0, 100, 200], tmp_path / "run", cfg,
                                               base_url=url, cache_dir=cache)
    assert (done == [0, 200] and missing == [100]
            and common.list_checkpoints(tmp_path / "run") == [0, 200])
    tokens = torch.randint(0, 5000, (2, CTX))
    for s, m in models.items():
        torch.testing.assert_close(data.load_model(tmp_path / "run", s)(tokens), m(tokens))
    assert isinstance(data.task_for(tmp_path / "run"), lm_data.LMTask)
    assert kept.is_file() and not lm_hub.cached_file("o/L2", "checkpoints/checkpoint_0000200.pth",
                                                     cache_dir=cache)
    with pytest.raises(lm_hub.HubError, match="none of the 1 steps"):
        lm_data.import_checkpoints("o/L2", [300], tmp_path / "run3", cfg, base_url=url,
                                   cache_dir=cache)
    # export -> TransformerLens state dicts and config -> import from the folder: the same
    # parameters
    tl = lm_data.export_transformer_lens(tmp_path / "run", tmp_path / "tl")
    assert json.loads((tl / "config.json").read_text())["n_heads"] == 2
    sd = torch.load(tl / "checkpoints/checkpoint_0000200.pth", weights_only=True)
    assert (sd["blocks.1.attn.mask"].shape == (CTX, CTX)
            and sd["blocks.1.attn.IGNORE"] == float("-inf"))
    done, _ = lm_data.import_checkpoints(str(tl), [0, 200], tmp_path / "run2", lm_data.DEFAULTS)
    for s in done:
        a, b = common.load_params(tmp_path / "run", s), common.load_params(tmp_path / "run2", s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transformer_lens_export_loads_strictly_with_equal_logits():
    tl = pytest.importorskip("transformer_lens")
    cfg = dict(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, d_model=8, seed=1)
    m = LMConfig(**{k: v for k, v in cfg.items() if k != "seed"}).build(4)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()
    sd = lm_hub.to_transformer_lens({k: v.detach() for k, v in m.named_parameters()}, 2)
    # load_state_dict(strict=True)
    hooked = lm_hub.hooked_transformer(sd, lm_hub.transformer_lens_config(cfg))
    assert isinstance(hooked, tl.HookedTransformer)
    tokens = torch.randint(0, 50, (3, 16))
    torch.testing.assert_close(hooked(tokens), m(tokens), atol=1e-5, rtol=1e-5)
    back = lm_hub.from_transformer_lens(hooked)  # a HookedTransformer itself, or its state dict
    assert all(torch.equal(back[k], v) for k, v in m.named_parameters())


# ------------------------------------------------------------------------------------ the paper's
# data files
# written by pyarrow 26's RecordBatchStreamWriter, as datasets' save_to_disk
FIXTURES = ROOT / "tests" / "fixtures"


def test_arrow_shards_and_hub_corpora(hub, tmp_path, lm_dir, monkeypatch):
    # contents, a metadata struct, an id; 2 batches
    docs = lm_hub.read_documents(FIXTURES / "dsir-sample.arrow")
    assert docs == ["The first document of the sample.",
                    "Ünïcode ✓ and a second line.\nNew line here.", "", "Last one"]
    # a *-tokens shard: rows of 16 ids
    rows = lm_hub.read_documents(FIXTURES / "dsir-tokens-sample.arrow")
    assert (len(rows) == 40
            and all(r.dtype == np.uint16 and len(r) == 16 and r[0] == 4999 for r in rows))
    # token rows pack as they are: with rows of the same length every row comes back unchanged
    (tmp_path / "tok").mkdir()
    shutil.copy(FIXTURES / "dsir-tokens-sample.arrow", tmp_path / "tok")
    d = tmp_path / "packed"
    lm_data.prepare(d, str(tmp_path / "tok"), 5000, 16, 0.2, str(lm_dir / "tokenizer.json"),
                    progress=lambda m: 0)
    packed = np.concatenate([lm_data.open_rows(d, "train"), lm_data.open_rows(d, "test")])
    assert sorted(map(bytes, packed)) == sorted(map(bytes, rows))
    with pytest.raises(common.ConfigError, match="token rows"):
        lm_data.prepare(tmp_path / "p2", str(tmp_path / "tok"), 5000, 16, 0.2, "train")
    # hub:<repo>:<files> reads shards through the downloader
    H, url, cache = hub
    _put(H, "datasets/o/pile", "train-100k.jsonl", b'{"contents": "one"}\n{"text": "two"}\n')
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert lm_data.load_corpus("hub:datasets/o/pile:train-100k.jsonl") == ["one", "two"]
    # the GPT-2 word list, through the same downloader, decoded from byte-level form
    _put(H, "openai-community/gpt2", "vocab.json",
         json.dumps({"Ġthe": 1, "cat": 0, "Ċ": 2}).encode())
    shutil.copytree(lm_dir, tmp_path / "words")
    assert lm_data.write_gpt2_words(tmp_path / "words") == ["cat", " the", "\n"]
    assert lm_data.LMTask(tmp_path / "words").words() == ["cat", " the", "\n"]


def test_published_llc_convention_matches_the_reference_estimator():
    """The paper's online estimator, replayed on a loss trace: chains run one after another and each
    update uses the mean of all C draw-0 slots, those of chains not yet run still 0 (language.md
    §3)."""
    rng = np.random.default_rng(0)
    C, T, nbeta = 5, 7, 100 / math.log(100)
    trace = 3 + rng.random((C, T))
    slots, llcs = np.zeros((C, T)), np.zeros((C, T))
    for c in range(C):
        for t in range(T):
            slots[c, t] = trace[c, t]
            if t:
                llcs[c, t] = (t * llcs[c, t - 1]
                              + nbeta * (trace[c, t] - slots[:, 0].mean())) / (t + 1)
    init = 3.2  # any L(w*): ours subtracts it, the conversion adds it back
    ours = nbeta * (trace.mean(1) - init)
    got = lm_eval.published_llc(ours, init, nbeta, T, draw0=trace[:, 0])
    np.testing.assert_allclose(got["llc_per_chain"], llcs[:, -1], rtol=1e-12)
    assert got["llc_mean"] == pytest.approx(llcs[:, -1].mean()) and got["llc_std"] == pytest.approx(
        llcs[:, -1].std(ddof=1))
    # every draw 0 at L(w*): the published mean sits nbeta L0 (C-1)/(2C) (1-1/T) above ours
    trace[:, 0] = init
    got = lm_eval.published_llc(nbeta * (trace.mean(1) - init), init, nbeta, T)
    bias = got["llc_mean"] - nbeta * (trace.mean(1) - init).mean()
    assert bias == pytest.approx(nbeta * init * (C - 1) / (2 * C) * (1 - 1 / T)) and bias > 0


def test_hub_command_lines(tmp_path):
    for module in ("lm.hub", "lm.data"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0 and "usage" in r.stdout
        r = subprocess.run([sys.executable, "-m", module,
                            "download" if module == "lm.hub" else "import",
                            "x", "--bogus=1"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path),
           "LM_HUB_BACKEND": "requests"}
    r = subprocess.run([sys.executable, "-m", "lm.hub", "download", "o/r", "f.json"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("lm.hub: o/r/f.json is not in the cache")


# ----------------------------------------------------------------------------------------------
# evaluations
def test_head_scores_on_hand_built_patterns():
    B, H, T = 6, 3, 20
    lengths = torch.tensor([16, 17, 18, 19, 20, 20])
    p = torch.zeros(B, H, T, T)
    p[:, 0] = torch.diag(torch.ones(T - 1), -1)  # head 0 attends to the previous token
    p[:, 0, 0, 0] = 1
    p[:, 1] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # head 1 uniform
    p[:, 2] = torch.eye(T)  # head 2 attends to itself
    s = lm_eval.previous_token_score(p, lengths)
    assert s[0] == pytest.approx(1.0) and s[2] == 0
    assert s[1].item() == pytest.approx((1 / lengths.double()).mean().item())
    # prefix matching: from the repeat to the token after the first occurrence
    first, second = torch.tensor([2, 5, 7, 3, 1, 4]), torch.tensor([12, 15, 18, 11, 19, 13])
    p = torch.zeros(B, H, T, T)
    p[torch.arange(B), 0, second, first + 1] = 1  # induction head
    # attends to the earlier copy itself: not induction
    p[torch.arange(B), 1, second, first] = 1
    s = lm_eval.prefix_matching_score(p, first, second)
    assert s.tolist() == [1.0, 0.0, 0.0]


def test_synthetic_sequences_follow_the_spec():
    tokens, lengths = lm_eval.previous_token_data(500, 5000, seed=0)
    assert tokens.shape == (500, 64) and (tokens[:, 0] == 4999).all() and tokens[:, 1:].max() < 4999
    assert lengths.min() >= 16 and lengths.max() <= 64
    assert torch.equal(lm_eval.previous_token_data(500, 5000, seed=0)[0], tokens)
    tokens, first, second = lm_eval.prefix_matching_data(500, 128, 5000, seed=0)
    assert (tokens.shape == (500, 128) and (tokens[:, 0] == 4999).all()
            and tokens[:, 1:].max() < 4999)
    assert first.min() >= 1 and first.max() <= 63 and second.min() >= 65 and second.max() <= 127
    b = torch.arange(500)
    s = tokens[b, first]
    assert torch.equal(tokens[b, second], s)
    assert ((tokens == s[:, None]).sum(1) == 2).all()  # s occurs exactly twice
    # on a model: shapes, chance level at init
    m = LMConfig(n_ctx=128, d_model=16, n_head=2).build(0)
    pt, pm = lm_eval.previous_token_scores(m, n=200), lm_eval.prefix_matching_scores(m, n=200)
    assert pt.shape == pm.shape == (2, 2)
    assert 0.01 < pt.mean() < 0.06 and 0.002 < pm.mean() < 0.03


def test_k_composition_against_the_formula():
    m = LMConfig(vocab_size=30, n_ctx=8, n_head=3, d_model=12).build(5)
    sd = lm_hub.to_transformer_lens({k: v.detach() for k, v in m.named_parameters()}, 3)
    W = lambda x, layer, h: sd[f"blocks.{layer}.attn.W_{x}"][h].double().numpy()  # noqa: E731
    got = lm_eval.k_composition_scores(m)
    assert got.shape == (3, 3)
    for h0 in range(3):
        for h1 in range(3):
            ov = W("V", 0, h0) @ W("O", 0, h0)
            qk = W("Q", 1, h1) @ W("K", 1, h1).T
            want = np.linalg.norm(ov @ qk.T) / (np.linalg.norm(ov) * np.linalg.norm(qk))
            assert got[h0, h1].item() == pytest.approx(want, rel=1e-5)
    # rank one: |cos| between what the layer-0 head writes and what the layer-1 key reads
    u, v, w = torch.randn(3, 12)
    A, B = torch.outer(u, v), torch.outer(w, v)
    assert lm_eval.composition_score(A, B.T).item() == pytest.approx(1.0, rel=1e-5)
    v2 = torch.randn(12)
    v2 -= (v2 @ v) / (v @ v) * v
    assert lm_eval.composition_score(A, torch.outer(v2, w)).item() == pytest.approx(0.0, abs=1e-6)


class _Bigram(nn.Module):
    """A model whose logits at each position are log B[current token]: the bigram score's optimum.
    """

    def __init__(self, table, V):
        super().__init__()
        self.cfg = LMConfig(vocab_size=V, n_ctx=32)
        self.logB = torch.log(
            lm_eval._dense_rows(table, torch.arange(V), V).float().clamp_min(1e-30))

    def forward(self, tokens, positions=True):
        return self.logB[tokens]


def test_bigram_table_entropy_and_score():
    rows = np.array([[4, 0, 1, 0, 2, 0, 1, 3], [4, 0, 1, 1, 2, 3, 0, 1]], dtype=np.uint16)
    t = lm_eval.bigram_table(rows, 5)
    dense = lm_eval._dense_rows(t, torch.arange(5), 5)
    torch.testing.assert_close(dense[0], torch.tensor([0, 4 / 5, 1 / 5, 0, 0], dtype=torch.float64))
    # every token is followed here
    torch.testing.assert_close(dense.sum(1), torch.ones(5, dtype=torch.float64))
    tokens = torch.from_numpy(rows.astype(np.int64))
    H = lm_eval.bigram_entropy(t, tokens, n=2000)
    assert 0 < H < math.log(5)
    model = _Bigram(t, 5)
    assert lm_eval.bigram_score(model, tokens, t, n_seq=2) >= 0
    # the optimum reaches the entropy of the rows it is scored on
    big = torch.from_numpy(np.tile(rows, (50, 1)).astype(np.int64))
    score = lm_eval.bigram_score(model, big, t, n_seq=100)
    c = big[torch.arange(100), lm_eval._sample_positions(big, 100, 0)[1]]
    Hc = -(dense * dense.clamp_min(1e-30).log()).sum(1)
    assert score == pytest.approx(Hc[c].mean().item(), rel=1e-5)


def test_ngrams_icl_and_per_position_loss():
    enc = {" cat": [1, 2], " dog": [3], " a b": [4, 220], " emu": [5, 6], " gnu": [7, 8, 9]}
    seqs = lm_eval.ngram_sequences(enc.get, list(enc), 2, bos=49)
    assert seqs.tolist() == [[49, 1, 2], [49, 5, 6]]
    assert lm_eval.ngram_sequences(enc.get, list(enc), 2, limit=1, bos=49).shape == (1, 3)
    m = TINY.build(0)
    logits = m(seqs[:, :-1])[:, -1]
    assert lm_eval.ngram_loss(m, seqs) == pytest.approx(F.cross_entropy(logits, seqs[:, -1]).item(),
                                                        rel=1e-5)
    assert lm_eval.icl_positions(1024) == (48, 498)
    tokens = torch.randint(0, 50, (5, 16))
    pp = lm_eval.per_position_loss(m, tokens, batch_size=2)
    want = F.cross_entropy(m(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:],
                           reduction="none").mean(0)
    torch.testing.assert_close(pp.float(), want)
    assert not torch.allclose(lm_eval.position_ablated_loss(m, tokens), pp)
    assert lm_eval.true_token_logits(m, tokens, n=5).shape == (5,)
    words = lm_eval.words_from_texts(["the cat and the dog", "the end"])
    assert words[:2] == [" the", " and"]


# ----------------------------------------------------------------------------------------------
# training
def _lm_cfg(lm_dir, out, *extra):
    return common.configure(LM_DEFAULTS, [str(ROOT / "configs" / "lm_tiny.py"), f"--out_dir={out}",
                                             f"--data_dir={lm_dir}", f"--n_ctx={CTX}", *extra])


def test_lm_tiny_resumes_bit_identically(lm_dir, tmp_path):
    small = ["--d_model=16", "--n_head=2", "--batch_size=4", "--max_steps=13", "--n_log=0",
             "--n_lin=0", "--ckpt_every=3", "--eval_batch_size=8", "--log_interval=1"]
    ref = train.train(_lm_cfg(lm_dir, tmp_path / "ref", *small))
    train.train(_lm_cfg(lm_dir, tmp_path / "cut", *small, "--stop_at=6"))
    assert common.list_checkpoints(tmp_path / "cut") == [0, 3, 6]
    got = train.train(_lm_cfg(lm_dir, tmp_path / "cut", *small))
    assert got == {**ref, "step_time": got["step_time"]}
    a, b = common.load_params(tmp_path / "ref", 12), common.load_params(tmp_path / "cut", 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = common.read_jsonl(tmp_path / "cut" / "log.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(13))
    cfg = common.load_run(tmp_path / "ref")
    assert cfg["task"] == "lm" and isinstance(data.load_model(tmp_path / "ref", 12), LMTransformer)


@pytest.mark.slow
def test_lm_tiny_loss_falls_below_the_unigram_entropy(lm_dir, tmp_path):
    H1 = lm_data.read_meta(lm_dir)["unigram_entropy"]
    train.train(_lm_cfg(lm_dir, tmp_path, "--d_model=32", "--batch_size=8", "--lr=1e-2",
                        "--max_steps=300", "--n_log=0", "--n_lin=0", "--ckpt_every=299",
                        "--eval_batch_size=32"))
    first, last = [r["loss"] for r in common.read_jsonl(tmp_path / "log.jsonl")
                   if r["kind"] == "eval"]
    assert first > math.log(5000) - 0.2 and last < H1 - 0.3, (first, last, H1)


def test_llc_py_published_convention_columns(lm_dir, tmp_path):
    """llc.py --published adds the paper's LM convention next to our estimate, equal to
    lm_eval.published_llc."""
    import llc
    cfg = _lm_cfg(lm_dir, tmp_path / "run", "--d_model=16", "--n_head=2", "--batch_size=4",
                  "--max_steps=3", "--n_log=1", "--n_lin=2", "--ckpt_every=0")
    train.train(cfg)
    llc.main([str(tmp_path / "run"), "--num_chains=3", "--num_draws=5", "--num_burnin=0",
              "--batch_size=2", "--n=8", "--published", "--steps=2", "--trace_points=5"])
    (row,) = common.read_jsonl(tmp_path / "run" / "llc.jsonl")
    want = lm_eval.published_llc(row["llc_per_chain"], row["init_loss"], row["nbeta"],
                                 row["num_draws"], draw0=[t[0] for t in row["loss_trace"]])
    assert row["llc_mean_published"] == pytest.approx(want["llc_mean"], rel=1e-6)
    # the reference's running init loss biases upward
    assert row["llc_mean_published"] > row["llc_mean"]


def test_code_and_prose_subsets_for_data_refined_llcs(lm_dir):
    """The default corpus mixes prose and Python examples: 'code' rows are mostly code-like lines,
    'prose' rows hardly any; together they are a strict subset of the training rows, and the task
    interface is kept."""
    task = lm_data.LMTask(lm_dir)
    code, prose = task.refined("code"), task.refined("prose")
    tok = task.tokenizer()

    def share(rows):
        text = [tok.decode(r.astype(np.int64).tolist()) for r in rows[:50]]
        lines = [ln for t in text for ln in t.splitlines() if ln.strip()]
        return np.mean([ln.lstrip().startswith((">>>", "...", "def ", "import ", "return "))
                        or ln.startswith("    ")
                        for ln in lines])
    assert share(code.train) > 0.4 and share(prose.train) < 0.1
    assert (0 < len(code.train) < len(task.train)
            and len(code.train) + len(prose.train) < len(task.train))
    xs, ys = code.sample(torch.Generator().manual_seed(0), 4)
    assert xs.shape == (4, CTX - 1) and torch.equal(xs[:, 1:], ys[:, :-1])
    with pytest.raises(common.ConfigError, match="code, prose or a corpus folder"):
        task.refined("poetry")


def test_a_corpus_folder_as_data_refined_distribution(lm_dir, tmp_path):
    """data_refine=<folder>: its documents packed once with the run's own tokenizer, beside the
    run's data."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    (folder / "b.txt").write_text("The cat sat on the mat. " * 300)
    task = lm_data.LMTask(lm_dir)
    sub = task.refined(str(folder))
    assert (sub.data_dir.parent == lm_dir.parent and sub.vocab_size == task.vocab_size
            and sub.n_ctx == task.n_ctx)
    assert (sub.data_dir / "tokenizer.json").read_text() == (lm_dir / "tokenizer.json").read_text()
    # prepared once, reused
    assert len(sub.train) > 0 and task.refined(str(folder)).data_dir == sub.data_dir


def test_per_token_susceptibilities_by_token_class(lm_dir, tmp_path):
    """llc.py --token_rows on the LM: each head's row names an .npz of per-token chi and se over
    the token rows; analyze.py classes the tokens (repeats first: the bigram occurred earlier in
    the row) and draws them (figure 11); the classes cover every token."""
    import llc
    import analyze
    run = tmp_path / "run"
    train.train(_lm_cfg(lm_dir, run, "--d_model=16", "--n_head=2", "--batch_size=4",
                        "--max_steps=3", "--n_log=1", "--n_lin=2", "--ckpt_every=0"))
    llc.main([str(run), "--restrictions=heads", "--probes=code,prose", "--token_rows=3",
              "--probe_rows=6", "--observe_every=1", "--num_chains=3", "--num_draws=8",
              "--num_burnin=0", "--batch_size=2", "--n=8", "--steps=2", "--trace_points=4"])
    rows = common.read_jsonl(run / "llc_heads.jsonl")
    assert [r["restriction"] for r in rows] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    for r in rows:
        assert set(r["susceptibility"]) == {"code", "prose"}
        with np.load(run / r["token_susceptibility"]) as f:
            z = dict(f)
        assert z["chi"].shape == z["se"].shape == z["targets"].shape == (3, CTX - 1)
        assert np.isfinite(z["chi"]).all() and (z["se"] > 0).all()
    task = lm_data.LMTask(lm_dir)
    labels, names = task.token_classes(z["inputs"], z["targets"])
    x, y = z["inputs"].tolist(), z["targets"].tolist()
    for r in range(3):  # a repeat is exactly a (previous token, token) pair seen before in the row
        pairs = list(zip(x[r], y[r]))
        assert [names[k] == "repeat" for k in labels[r]] == [
            p in pairs[:t] for t, p in enumerate(pairs)]
    summary = analyze.main([str(run), "--lm_rows=4", "--lm_ed=4", "--lm_head_seqs=4",
                            "--lm_bigram_seqs=4", "--lm_ngrams=4", "--hessian_probes=0",
                            "--lanczos_iters=0"])
    tok = summary["susceptibility"]["tokens"]
    assert tok["tokens"] == 3 * (CTX - 1) == sum(tok["counts"].values())
    assert len(tok["components"]) == 4 and "figures/11_token_susceptibility.png" in (
        summary["figures"])

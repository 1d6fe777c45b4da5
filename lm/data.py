"""Language-model data: corpora, the byte-level BPE tokenizer, packed token files (tokenizer.json,
train.bin and test.bin of uint16 rows, BOS first, words.txt, meta.json written last), the LM task,
and the import of published checkpoints into a run folder. The test split is whole documents the
tokenizer never sees."""
import ast
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import lm.eval as lm_eval
import lm.hub as lm_hub
from lm.model import LMConfig
from model import weight_norm

USAGE = """

    python -m lm.data prepare configs/lm_tiny.py          # train.py does this by itself when needed
    python -m lm.data stats data/python-v5000-ctx128
    python -m lm.data import georgeyw/L2W256-3m-rr --steps=0,100,900 --out_dir=out/L2W256-paper
    # TransformerLens; `import` reads it back
    python -m lm.data export out/lm_tiny --out_dir=out/lm_tiny-tl
    # the paper's GPT-2 word list (n-grams)
    python -m lm.data words data/python-v5000-ctx64
"""
ROOT = Path(__file__).resolve().parent.parent  # the repository
EOT = "<|endoftext|>"
DEFAULTS = dict(  # the language model's data keys (train.py adds them to its own)
    # python (CPython's docs) | python-source (its docs and whole stdlib source: code and prose;
    # both without download) | kjv (Debian bible-kjv) | a folder | hub:<repo>:<files>
    corpus="python",
    # train (byte-level BPE on the training split) | a tokenizer.json | hub (the paper's)
    tokenizer="train",
    # tokenizer + packed tokens; "" = data/<corpus>-v<vocab_size>-ctx<n_ctx> in the repository
    data_dir="",
    vocab_size=5000,    # id vocab_size-1 = <|endoftext|> (BOS/EOS)
    n_ctx=1024,         # tokens per packed row (the model sees n_ctx-1 inputs per row)
    test_frac=0.05,     # held-out share of the documents (test loss and every LM evaluation)
)


# ---------------------------------------------------------------------------------------------
# corpora
def python_docs_corpus():
    """English that every CPython installation carries: the reference-manual topics of pydoc_data,
    then the docstrings of each standard-library module (read with ast, never imported; source
    order). One document per topic and per module."""
    return list(_python_docs())


@functools.lru_cache(maxsize=1)
def _python_docs():
    import pydoc_data.topics as topics
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(root, f).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = [d for d in _docstrings(tree) if d]
            if parts:
                docs.append("\n\n".join(parts))
    return tuple(docs)


def python_source_corpus():
    """Code and prose that every CPython installation carries, no download: the reference-manual
    topics of pydoc_data, then the whole source of each standard-library module, its tests
    included, then that of pip and setuptools as ensurepip bundles them (code with its docstrings
    and comments). One document per topic and per file."""
    import pydoc_data.topics as topics
    docs = [topics.topics[k] for k in sorted(topics.topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__")
                         and not d.startswith("."))
        docs += [t for f in sorted(files) if f.endswith(".py")
                 if (t := _text(Path(root, f).read_bytes())) is not None]
    for wheel in sorted((lib / "ensurepip" / "_bundled").glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            docs += [t for n in sorted(z.namelist()) if n.endswith(".py")
                     if (t := _text(z.read(n))) is not None]
    return docs


def _text(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few test files are deliberately in other encodings
        return None


def _docstrings(node):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield ast.get_docstring(node)
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def kjv_corpus():
    """The King James Bible from Debian's bible-kjv(-text): one document per chapter, verses joined
    by spaces."""
    if not shutil.which("bible"):
        raise RuntimeError("corpus 'kjv' needs Debian's King James Bible: "
                           "apt-get install -y bible-kjv bible-kjv-text")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    chapters, verse = {}, re.compile(r"^(\d?[A-Za-z]+\d+):\d+ (.*)$")
    for m in filter(None, map(verse.match, out.splitlines())):
        chapters.setdefault(m[1], []).append(m[2].strip())
    return [" ".join(v) for v in chapters.values()]


def folder_corpus(path):
    """The documents of every .txt/.md/.jsonl(.gz)/.parquet/.arrow file under `path`, in sorted path
    order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus folder {path} does not exist")
    docs = []
    for p in sorted(path.rglob("*")):
        docs += lm_hub.read_documents(p)
        if p.stat().st_size > 1e7:
            common.progress(f"read {p.name}: {len(docs):,} documents so far")
    if not docs:
        raise ValueError(f"corpus folder {path} holds no .txt, .md, .jsonl(.gz), .parquet or "
                         ".arrow files")
    return docs


def load_corpus(corpus):
    """'python' or 'python-source' (no download), 'kjv' (Debian), a folder, or
    hub:<repo>:<file>[,<file>...] (README: the paper's)."""
    if corpus == "python":
        return python_docs_corpus()
    if corpus == "python-source":
        return python_source_corpus()
    if corpus == "kjv":
        return kjv_corpus()
    if corpus.startswith("hub:"):
        repo, _, files = corpus[4:].partition(":")
        return [d for f in files.split(",")
                for d in lm_hub.read_documents(lm_hub.hub_download(repo, f))]
    return folder_corpus(corpus)


def split_documents(docs, test_frac, seed=0):
    """(train, test) sorted document indices: seeded random documents go to test until it holds
    test_frac of the text."""
    order = np.random.default_rng(seed).permutation(len(docs))
    target, held, test = test_frac * sum(map(len, docs)), 0, []
    for i in order:
        if held >= target:
            break
        test.append(int(i))
        held += len(docs[i])
    test_set = set(test)
    return [i for i in range(len(docs)) if i not in test_set], sorted(test)


# -------------------------------------------------------------------------------------------
# tokenizer
def train_tokenizer(texts, vocab_size=5000):
    """GPT-2-style byte-level BPE with vocab_size-1 learned tokens, then <|endoftext|> as the last
    id. The 256-byte alphabet comes first in sorted order, so the space token "Ġ" is id 220 as in
    the paper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=True)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOT])
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path))


def get_tokenizer(source, texts, vocab_size):
    """'train' (BPE on `texts`), a tokenizer.json path, or 'hub' / 'hub:<repo>' (the paper's 5k
    tokenizer)."""
    if source == "train":
        tok = train_tokenizer(texts, vocab_size)
    elif source.startswith("hub"):
        repo = source.partition(":")[2] or lm_hub.PAPER_TOKENIZER
        tok = load_tokenizer(lm_hub.hub_download(repo, "tokenizer.json"))
    else:
        tok = load_tokenizer(source)
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(EOT) != vocab_size - 1:
        raise ValueError(f"tokenizer {source!r} has {tok.get_vocab_size()} ids with {EOT} at "
                         f"{tok.token_to_id(EOT)}; need {vocab_size} ids with {EOT} last "
                         "(a corpus too small for that many merges? lower vocab_size)")
    return tok


# ---------------------------------------------------------------------------------------------
# packing
def pack(tok, docs, n_ctx, path, batch_docs=256):
    """Tokenise the documents, join them with EOS, cut the stream into rows of n_ctx-1 tokens (the
    remainder is dropped) and prepend BOS: a uint16 (rows, n_ctx) file. Token rows (BOS first) are
    re-cut as they are. Returns (rows, tokens in the stream)."""
    eos, width = tok.token_to_id(EOT), n_ctx - 1
    tmp, rows, carry, seen = Path(str(path) + ".tmp"), 0, np.zeros(0, np.uint16), 0
    bar = common.Progress(f"packing {Path(path).name}", len(docs), "docs")
    with open(tmp, "wb") as f:
        for i in range(0, len(docs), batch_docs):
            bar.update(i)
            part = docs[i:i + batch_docs]
            ids = ([np.append(np.asarray(e.ids, np.uint16), np.uint16(eos))
                    for e in tok.encode_batch(part)]
                   # token rows: their stream, BOS dropped
                   if isinstance(part[0], str) else [d[1:] for d in part])
            stream = np.concatenate([carry, *ids])
            seen += len(stream) - len(carry)
            k = len(stream) // width
            block = np.empty((k, n_ctx), np.uint16)
            block[:, 0], block[:, 1:] = eos, stream[:k * width].reshape(k, width)
            f.write(block.tobytes())
            rows, carry = rows + k, stream[k * width:]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows, seen


def open_rows(data_dir, split):
    """The packed rows of a split as a read-only (rows, n_ctx) uint16 memmap."""
    meta = read_meta(data_dir)
    n, T = meta["splits"][split]["rows"], meta["n_ctx"]
    if n == 0:
        return np.zeros((0, T), np.uint16)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r", shape=(n, T))


def unigram_entropy(rows, vocab_size):
    """Shannon entropy (nats) of the token frequencies: the loss of the best context-free predictor.
    """
    counts = np.zeros(vocab_size, np.int64)
    for i in range(0, len(rows), 4096):
        counts += np.bincount(np.asarray(rows[i:i + 4096]).ravel(), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------ data
# folder
def data_dir_for(cfg):
    """The run's data folder: cfg['data_dir'], or data/<corpus>-v<vocab>-ctx<n_ctx> in the
    repository."""
    if cfg["data_dir"]:
        return Path(cfg["data_dir"])
    name = Path(cfg["corpus"]).name if cfg["corpus"] not in ("python", "kjv") else cfg["corpus"]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    tok = ("" if cfg["tokenizer"] == "train"
           else "-" + re.sub(r"[^A-Za-z0-9]+", "_", cfg["tokenizer"])[-24:])
    return ROOT / "data" / f"{name}{tok}-v{cfg['vocab_size']}-ctx{cfg['n_ctx']}"


def read_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{data_dir} is not a prepared LM data folder ({path} is missing): "
                                "run `python -m lm.data prepare <config>` "
                                "(train.py does it by itself)")
    return json.loads(path.read_text())


def prepare(data_dir, corpus="python", vocab_size=5000, n_ctx=1024, test_frac=0.05,
            tokenizer="train", seed=0, progress=common.progress):
    """Build the data folder (idempotent: an existing complete folder with the same settings is
    reused; one with other settings is an error). Returns its meta dict."""
    data_dir = Path(data_dir)
    want = dict(corpus=corpus, vocab_size=vocab_size, n_ctx=n_ctx, test_frac=test_frac,
                tokenizer=tokenizer, split_seed=seed)
    if (data_dir / "meta.json").exists():
        meta = read_meta(data_dir)
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            raise common.ConfigError(f"{data_dir} holds data prepared with other settings "
                                     f"(saved vs now: {diff}); use another data_dir or delete it")
        return meta
    if vocab_size > 65536:
        raise common.ConfigError(f"vocab_size {vocab_size} does not fit the uint16 token files")
    progress(f"preparing LM data in {data_dir}: corpus {corpus!r}")
    docs = load_corpus(corpus)
    if not isinstance(docs[0], str) and tokenizer == "train":
        raise common.ConfigError(f"corpus {corpus!r} holds token rows: "
                                 "name the tokenizer that made them (hub)")
    train_ids, test_ids = split_documents(docs, test_frac, seed)
    train_docs, test_docs = [docs[i] for i in train_ids], [docs[i] for i in test_ids]
    progress(f"tokenizer: {tokenizer} ({len(train_docs)} training documents, "
             f"{sum(map(len, train_docs)):,} characters)")
    tok = get_tokenizer(tokenizer, train_docs, vocab_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write(data_dir / "tokenizer.json", tok.to_str())
    splits = {}
    for name, part in (("train", train_docs), ("test", test_docs)):
        rows, seen = pack(tok, part, n_ctx, data_dir / f"{name}.bin")
        splits[name] = {"docs": len(part), "chars": sum(map(len, part)), "tokens": seen,
                        "rows": rows}
    if splits["train"]["rows"] == 0 or splits["test"]["rows"] == 0:
        raise ValueError(f"corpus {corpus!r} is too small for rows of {n_ctx} tokens: {splits}")
    texts = (train_docs if isinstance(train_docs[0], str)
             else [tok.decode(d.tolist()) for d in train_docs[:2000]])
    common.atomic_write(data_dir / "words.txt",
                        "\n".join(w[1:] for w in lm_eval.words_from_texts(texts)) + "\n")
    meta = {**want, "bos": vocab_size - 1, "eos": vocab_size - 1, "dtype": "uint16",
            "space_id": tok.token_to_id("Ġ"), "splits": splits, "test_doc_ids": test_ids,
            "python": sys.version.split()[0] if corpus.startswith("python") else None}
    train_rows = np.fromfile(data_dir / "train.bin", np.uint16).reshape(-1, n_ctx)
    meta["unigram_entropy"] = unigram_entropy(train_rows, vocab_size)
    common.atomic_write(data_dir / "meta.json", json.dumps(meta, indent=1))
    s = splits["train"]
    progress(f"prepared {data_dir}: {s['docs']} + {splits['test']['docs']} documents, "
             f"{s['tokens']:,} training tokens ({s['chars'] / s['tokens']:.2f} chars/token), "
             f"{s['rows']} + {splits['test']['rows']} rows, "
             f"unigram entropy {meta['unigram_entropy']:.3f} nats")
    return meta


def prepare_for(cfg):
    return prepare(data_dir_for(cfg), cfg["corpus"], cfg["vocab_size"], cfg["n_ctx"],
                   cfg["test_frac"], cfg["tokenizer"])


# ---------------------------------------------------------------------------------------------- the
# task
def _lexical(s):
    """A token's class by its text (LMTask.token_classes)."""
    core = s.strip()
    if not core:
        return "whitespace"
    if core.isdigit():
        return "number"
    if not any(c.isalnum() for c in core):
        return "punctuation"
    return "word start" if s[0].isspace() else "word piece"


class LMTask:
    """The data of an LM run, with data.Task's interface: sample -> (inputs, targets), rows without
    their last / first token; loss: mean next-token cross-entropy (training and LLC); eval_data: the
    first held-out rows."""

    batched_grad = None  # no hand-derived gradient: the LLC uses autograd

    @classmethod
    def from_config(cls, cfg):
        return cls(data_dir_for(cfg), cfg["n_ctx"], cfg["vocab_size"])

    def __init__(self, data_dir, n_ctx=None, vocab_size=None):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(data_dir)
        self.vocab_size, self.n_ctx, self.bos = (self.meta["vocab_size"], self.meta["n_ctx"],
                                                 self.meta["bos"])
        for key, want in (("n_ctx", n_ctx), ("vocab_size", vocab_size)):
            if want is not None and self.meta[key] != want:
                raise common.ConfigError(f"{data_dir} holds data with {key}={self.meta[key]}, "
                                         f"but the run has {key}={want}")
        self.train, self.test = open_rows(data_dir, "train"), open_rows(data_dir, "test")

    def sample(self, gen, batch_size, device=None):
        """Rows drawn uniformly with replacement from the training split by `gen`, on its device (or
        `device`)."""
        idx = torch.randint(len(self.train), (batch_size,), generator=gen,
                            device=gen.device).cpu().numpy()
        rows = torch.from_numpy(self.train[idx].astype(np.int64)).to(device or gen.device)
        return rows[:, :-1], rows[:, 1:]

    @staticmethod
    def model_input(inputs, targets):
        return inputs

    @staticmethod
    def loss(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @staticmethod
    def loss_per_token(logits, targets):
        return LMTask.loss_elements(logits, targets).mean(0)

    @staticmethod
    def loss_elements(logits, targets):
        """(rows, tokens) the loss of every next-token prediction."""
        return F.cross_entropy(logits.transpose(-1, -2), targets, reduction="none")

    def token_classes(self, inputs, targets):
        """(a class index per target token, the class names): a repeat (the bigram of its input
        and itself occurred earlier in the row: what an induction head predicts), else by its text:
        a word start, a word piece, a number, punctuation, whitespace."""
        names = ["repeat", "word start", "word piece", "number", "punctuation", "whitespace"]
        text = [self.tokenizer().decode([int(t)]) for t in range(self.vocab_size)]
        kind = np.array([names.index(_lexical(s)) for s in text])
        labels = kind[np.asarray(targets)]
        for r, (x, y) in enumerate(zip(np.asarray(inputs).tolist(), np.asarray(targets).tolist())):
            seen = set()
            for t, pair in enumerate(zip(x, y)):
                if pair in seen:
                    labels[r, t] = 0
                seen.add(pair)
        return labels, names

    def eval_data(self, seed, batch_size):
        return torch.from_numpy(np.asarray(self.test[:batch_size]).astype(np.int64))

    @staticmethod
    def metrics(model, rows):
        return {**lm_eval.eval_row(model, rows), "weight_norm": weight_norm(model.parameters())}

    def tokenizer(self):
        return load_tokenizer(self.data_dir / "tokenizer.json")

    def refined(self, name):
        """The rows of a data-refined LLC (the model and loss stay the run's): 'code' / 'prose'
        training rows (at least half / at most a tenth of the non-blank lines code-like), or a
        corpus folder packed with the run's tokenizer."""
        if Path(name).is_dir():
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            out = self.data_dir.parent / f"{self.data_dir.name}-refine-{slug}"
            tok = str(self.data_dir / "tokenizer.json")
            prepare(out, name, self.vocab_size, self.n_ctx, self.meta["test_frac"], tok)
            return LMTask(out)
        if name not in ("code", "prose"):
            raise common.ConfigError(f"data_refine {name!r}: the language model offers code, prose "
                                     "or a corpus folder")
        code = re.compile(r"\s*(>>>|\.\.\.|\s{4}\S"
                          r"|(def|class|import|from|return|if|for|while|raise|try)\b|@\w)")
        tok, share = self.tokenizer(), []
        for row in self.train:
            text = tok.decode(row.astype(np.int64).tolist())
            lines = [ln for ln in text.splitlines() if ln.strip()]
            share.append(sum(bool(code.match(ln)) for ln in lines) / max(len(lines), 1))
        keep = np.flatnonzero(np.array(share) >= 0.5 if name == "code" else np.array(share) <= 0.1)
        if len(keep) == 0:
            raise common.ConfigError(f"data_refine {name!r}: no training row of {self.data_dir} "
                                     "qualifies")
        sub = LMTask.__new__(LMTask)
        sub.__dict__.update(self.__dict__, train=np.asarray(self.train[keep]))
        return sub

    def words(self):
        """The n-gram word list: words.json (`python -m lm.data words`: the paper's GPT-2
        vocabulary), else words.txt."""
        if (self.data_dir / "words.json").exists():
            return json.loads((self.data_dir / "words.json").read_text())
        return [" " + w for w in (self.data_dir / "words.txt").read_text().split()]

    def bigram_table(self):
        """P(next | current) on the training split (lm_eval.bigram_table), cached as bigram.npz."""
        path = self.data_dir / "bigram.npz"
        if not path.exists():
            buf = io.BytesIO()
            np.savez(buf, **lm_eval.bigram_table(self.train, self.vocab_size))
            common.atomic_write(path, buf.getvalue())
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


# ------------------------------------------------------------------ published checkpoints,
# TransformerLens
TL_KEYS = dict(n_layer="n_layers", d_model="d_model", n_head="n_heads", n_ctx="n_ctx",
               vocab_size="d_vocab")


def import_checkpoints(repo, steps, out_dir, cfg, *, pattern=lm_hub.PAPER["checkpoints"][1],
                       revision="main", base_url=None, cache_dir=None, keep_download=False):
    """Convert TransformerLens checkpoints (a hub repository, or a folder of the same layout such as
    `export` writes) into this project's run format, so llc.py and analyze.py read them like a run
    of train.py. Steps that are missing are skipped with a warning. torch.load(weights_only=True):
    no pickled code runs."""
    out_dir, src = Path(out_dir), Path(repo)
    # export's HookedTransformerConfig arguments
    if src.is_dir() and (src / "config.json").exists():
        tl = json.loads((src / "config.json").read_text())
        cfg = {**cfg, **{k: tl[v] for k, v in TL_KEYS.items()}}
    common.atomic_write(out_dir / "config.json", json.dumps(cfg, indent=1))
    mcfg = LMConfig(**{k: cfg[k] for k in LMConfig.__dataclass_fields__ if k in cfg})
    done, missing = [], []
    for step in steps:
        if step in common.list_checkpoints(out_dir):
            done.append(step)
            continue
        name, cached = pattern.format(step=step), src.is_dir() or keep_download
        try:
            if src.is_dir():
                path = src / name
                if not path.is_file():
                    raise lm_hub.HubNotFound(f"{path} does not exist")
            else:
                cached = cached or lm_hub.cached_file(repo, name, revision, cache_dir) is not None
                path = lm_hub.hub_download(repo, name, revision, base_url=base_url,
                                           cache_dir=cache_dir)
        except lm_hub.HubNotFound as e:
            common.progress(f"step {step} skipped: {e}")
            missing.append(step)
            continue
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  an unpickling error, a truncated zip, ...
            raise common.CheckpointError(f"{path} is not a readable checkpoint "
                                         f"({type(e).__name__}: {e}); delete it and import again")
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(sd, dict) and "embed.W_E" not in sd and key in sd:
                sd = sd[key]
        model = mcfg.build()
        params = common.check_params(lm_hub.from_transformer_lens(sd), model, path)
        model.load_state_dict(params, strict=False)
        common.save_checkpoint(out_dir, step, model)
        if not cached:  # downloaded only for this: the converted copy replaces it
            lm_hub.forget(path)
        done.append(step)
        common.progress(f"imported step {step} -> {common.ckpt_path(out_dir, step)}")
    common.progress(f"{out_dir}: {len(done)} of {len(steps)} steps"
                    + (f"; missing: {missing}" if missing else ""))
    if not done:
        raise lm_hub.HubError(f"none of the {len(steps)} steps could be found in {repo} "
                              f"({pattern})")
    return done, missing


def export_transformer_lens(run_dir, out_dir, steps=None, pattern=lm_hub.PAPER["checkpoints"][1]):
    """A run's checkpoints as TransformerLens state dicts in the paper's layout, with config.json
    holding the HookedTransformerConfig arguments (lm_hub.hooked_transformer builds the model)."""
    cfg, out_dir = common.load_run(run_dir), Path(out_dir)
    tl_cfg = lm_hub.transformer_lens_config(cfg)
    common.atomic_write(out_dir / "config.json", json.dumps(tl_cfg, indent=1))
    for step in steps or common.list_checkpoints(run_dir):
        buf = io.BytesIO()
        sd = lm_hub.to_transformer_lens(common.load_params(run_dir, step), cfg["n_head"])
        torch.save(sd, buf)
        common.atomic_write(out_dir / pattern.format(step=step), buf.getvalue())
    common.progress(f"exported {run_dir} -> {out_dir}")
    return out_dir


def write_gpt2_words(data_dir, repo=lm_hub.PAPER["gpt2_vocab"][0]):
    """words.json: the GPT-2 vocabulary's strings in id order (the paper's n-gram word list)."""
    words = lm_eval.gpt2_vocab_strings(lm_hub.hub_download(repo, "vocab.json"))
    common.atomic_write(Path(data_dir) / "words.json", json.dumps(words))
    return words


# ------------------------------------------------------------------------------------- the task
# table
# data.TASKS["lm"]
KIND = data.TaskKind(DEFAULTS, LMConfig, LMTask, prepare_for, {}, "lm.analysis:evaluator",
                     "lm.plots:figures", "LM", published_llc="lm.eval:published_columns")


# --------------------------------------------------------------------------------------- command
# line
PAPER_CONFIG = ROOT / "configs" / "L2W256.py"


def _parser():
    ap = lm_hub.Parser(prog="python -m lm.data", description=__doc__ + USAGE,
                       formatter_class=lm_hub.argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the data folder of a training config (its data keys)")
    p.add_argument("config", nargs="*",
                   help="config files and --key=value overrides of the data keys")
    p = sub.add_parser("stats", help="print a data folder's meta.json")
    p.add_argument("data_dir")
    p = sub.add_parser("words",
                       help="write the GPT-2 vocabulary into a data folder (n-gram word list)")
    p.add_argument("data_dir")
    p = sub.add_parser("export",
                       help="a run's checkpoints as TransformerLens state dicts + config.json")
    p.add_argument("run_dir")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--steps", default="", help="comma-separated, or start:stop:step (default: all)")
    p = sub.add_parser("import", help="TransformerLens checkpoints (a hub repository or a folder) "
                                      "into a run folder")
    p.add_argument("repo", help=f"e.g. {lm_hub.PAPER['checkpoints'][0]}, "
                                "or a folder that `export` wrote")
    p.add_argument("--steps", required=True, help="comma-separated, or start:stop:step")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--data_dir", default="",
                   help="the LM data folder the run's evaluations should read")
    p.add_argument("--pattern", default=lm_hub.PAPER["checkpoints"][1])
    p.add_argument("--config", default=str(PAPER_CONFIG),
                   help="the run's training config (model sizes, data)")
    p.add_argument("--revision", default="main")
    p.add_argument("--endpoint", default=None,
                   help="default $HF_ENDPOINT or https://huggingface.co")
    p.add_argument("--cache_dir", default=None,
                   help="default $HF_HUB_CACHE or ~/.cache/huggingface/hub")
    p.add_argument("--keep_download", action="store_true",
                   help="keep the .pth files in the hub cache")
    return ap


def main(argv):
    ap = _parser()
    a, rest = ap.parse_known_args(argv)
    if rest and a.cmd != "prepare":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    steps = a.steps.split(":") if getattr(a, "steps", "") else []
    steps = (list(range(*map(int, steps))) if len(steps) > 1
             else [int(x) for x in a.steps.split(",")] if steps else [])
    # a training config holds more than the data keys: only those are read here
    if a.cmd == "prepare":
        files = [x for x in a.config + rest if not x.startswith("--")]
        known = {k: v for f in files for k, v in common.read_config_file(f).items()
                 if k in DEFAULTS}
        cfg = common.configure({**DEFAULTS, **known},
                               [x for x in a.config + rest if x.startswith("--")])
        prepare_for(cfg)
    elif a.cmd == "stats":
        meta = {k: v for k, v in read_meta(a.data_dir).items() if k != "test_doc_ids"}
        print(json.dumps(meta, indent=1))
    elif a.cmd == "words":
        n_words = len(write_gpt2_words(read_meta(a.data_dir) and a.data_dir))
        print(f"{n_words:,} words -> {a.data_dir}/words.json")
    elif a.cmd == "export":
        export_transformer_lens(a.run_dir, a.out_dir, steps)
    else:
        cfg = {**DEFAULTS, **common.read_config_file(a.config), "out_dir": a.out_dir,
               "data_dir": a.data_dir}
        import_checkpoints(a.repo, steps, a.out_dir, cfg, pattern=a.pattern, revision=a.revision,
                           base_url=a.endpoint, cache_dir=a.cache_dir,
                           keep_download=a.keep_download)

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError, RuntimeError) as e:  # ConfigError: ValueError; HubError: OSError
        sys.exit(f"lm.data: {e}")

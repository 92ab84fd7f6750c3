"""The python-packages corpus: deduplicated files, capped, split by file."""

from __future__ import annotations

import json
import os

import numpy as np

from latentmoe.train import package_corpus
from latentmoe.train.config import DataSection
from latentmoe.train.data import TokenData, prepare_data


def _fake_site(tmp_path, monkeypatch):
    root = tmp_path / "site-packages"
    for pkg in ("alpha", "beta", "gamma"):
        (root / pkg).mkdir(parents=True)
        for i in range(10):
            (root / pkg / f"mod{i}.py").write_text(f"def {pkg}_{i}(x):\n    '''Return x.'''\n" + f"    y = x + {i}\n" * 40)
        # a vendored copy (whitespace differs) and packaging files: none of them enter twice or at all
        (root / pkg / "vendored.py").write_text("import os\n" + "def shared(a, b):  return a + b\n" * 20)
        (root / pkg / "LICENSE.txt").write_text("Permission is hereby granted " * 20)
    (root / "beta" / "vendored.py").write_text("import os\n" + "def shared(a,  b):  return a + b\n" * 20)
    (root / "gamma" / "blob.bin").write_bytes(b"\x00" * 1000)
    monkeypatch.setattr(package_corpus, "package_roots", lambda: [str(root)])
    return root


def test_documents_are_distinct_files_in_a_mixed_order(tmp_path, monkeypatch):
    _fake_site(tmp_path, monkeypatch)
    docs = list(package_corpus.python_packages())
    paths = [d.split("\n", 1)[0][2:] for d in docs]
    assert len(docs) == 31  # 30 modules + one of the 3 vendored copies
    assert sum(p.endswith("vendored.py") for p in paths) == 1
    assert not any("LICENSE" in p or p.endswith(".bin") for p in paths)
    assert paths[:3] != sorted(paths)[:3]  # hash order: a prefix mixes the packages
    capped = list(package_corpus.python_packages(max_chars=2000))
    assert 1 <= len(capped) < len(docs) and sum(map(len, capped[:-1])) < 2000 <= sum(map(len, capped))
    assert capped == docs[:len(capped)]


def test_held_out_split_is_by_file(tmp_path, monkeypatch):
    _fake_site(tmp_path, monkeypatch)
    out = str(tmp_path / "data")
    prepare_data(DataSection(corpus="python-packages", vocab_size=300, val_fraction=0.2), out, log=lambda *a: None)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["num_documents"] == 31
    from latentmoe.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(out)

    def headers(split):
        stream = np.concatenate([np.asarray(s) for s in TokenData(out, split).shards]).tolist()
        text = tok.decode(stream)
        return {line[2:] for line in text.splitlines() if line.startswith("# ") and line.endswith(".py")}

    train, val = headers("train"), headers("val")
    assert len(val) == 6 and len(train) == 25 and not train & val

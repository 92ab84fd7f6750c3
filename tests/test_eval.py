"""`latentmoe eval perplexity` and evaluation.perplexity: NLL, perplexity and bits per byte against transformers on
the same weights, windows that score every token once, corpus splits as training makes them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentmoe.cli import main
from latentmoe.evaluation.perplexity import score_documents, text_perplexity, windows
from latentmoe.tokenizer import Tokenizer

from _server_helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Multi-head latent attention compresses keys and values. Hello! How are you today?",
         "Unicode: 数学是科学的语言。 naïve café 🙂 and the mixture of experts routes each token."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ppl"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import DeepseekV2ForCausalLM
    return DeepseekV2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def ref_nll(hf, ids: list[int], context: int | None = None) -> float:
    """-sum log p(x_p | previous tokens) for p >= 1 by transformers; with `context`, at most that many before x_p."""
    total = 0.0
    with torch.no_grad():
        if context is None:
            lp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            return -sum(lp[p - 1, ids[p]].item() for p in range(1, len(ids)))
        for p in range(1, len(ids)):
            window = ids[max(0, p - context):p + 1]
            lp = hf(torch.tensor([window])).logits[0, -2].double().log_softmax(-1)
            total -= lp[ids[p]].item()
    return total


@pytest.mark.parametrize("n, max_len, stride", [(1, 4, 3), (2, 4, 3), (10, 4, 3), (10, 4, 1), (17, 5, 3),
                                                (5, 8, 2), (64, 16, 7), (64, 16, 15)])
def test_windows_score_every_token_once(n, max_len, stride):
    scored = []
    for begin, end, first in windows(n, max_len, stride):
        assert end - begin <= max_len and begin < first < end
        assert first - begin >= min(first, max_len - stride)   # the promised context
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_nll_matches_transformers(ckpt, hf):
    from latentmoe.checkpoint import load_model
    model = load_model(ckpt)
    tok = Tokenizer.from_dir(ckpt)
    docs = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in TEXTS]
    # One window per document: the full-context NLL.
    full = score_documents(model, docs, max_len=256)
    assert full.tokens == sum(len(d) - 1 for d in docs)
    assert full.nll == pytest.approx(sum(ref_nll(hf, d) for d in docs), rel=1e-5)
    # Windows of 8 moved by 1: every token sees exactly the 7 before it (batched across documents).
    short = score_documents(model, docs, max_len=8, stride=1, batch_size=5)
    assert short.nll == pytest.approx(sum(ref_nll(hf, d, context=7) for d in docs), rel=1e-5)
    # Bits per byte: the same NLL over the UTF-8 bytes of the text.
    r = text_perplexity(model, tok, TEXTS, max_len=256)
    assert r.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert r.bits_per_byte == pytest.approx(full.nll / math.log(2) / r.bytes, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(full.nll / full.tokens), rel=1e-6)


def test_eval_perplexity_command(ckpt, hf, tmp_path, capsys):
    tok = Tokenizer.from_dir(ckpt)
    files = []
    for i, t in enumerate(TEXTS):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(t, encoding="utf-8")
    out_file = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", ckpt, "--text", str(files[0]), "--text", str(files[1]), "--device", "cpu",
                 "--max-len", "32", "--stride", "16", "--output", str(out_file), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out_file.read_text())
    assert result["documents"] == 2 and result["max_len"] == 32 and result["stride"] == 16
    docs = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in TEXTS]
    # 16 new tokens per window of 32: a token's context is everything since the start of its window
    nll = 0.0
    for d in docs:
        for begin, end, first in windows(len(d), 32, 16):
            with torch.no_grad():
                lp = hf(torch.tensor([d[begin:end]])).logits[0].double().log_softmax(-1)
            nll -= sum(lp[p - begin - 1, d[p]].item() for p in range(first, end))
    n = sum(len(d) - 1 for d in docs)
    assert result["tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / result["bytes"], rel=1e-5)


def test_corpus_split_is_trainings(ckpt, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document number {i}: hello there", encoding="utf-8")
    from latentmoe.train.data import corpus_documents, document_split
    docs = corpus_documents(str(corpus))
    held_out = [d for i, d in enumerate(docs) if document_split(i, 0.5) == "val"]
    assert 0 < len(held_out) < len(docs)
    assert main(["eval", "perplexity", ckpt, "--corpus", str(corpus), "--val-fraction", "0.5", "--device", "cpu",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == len(held_out) and result["data"].endswith(":val")
    assert result["bytes"] == sum(len(d.encode()) for d in held_out)


@pytest.mark.parametrize("argv, message", [
    (["--text", "/nonexistent/file.txt"], "--text /nonexistent/file.txt: no such file"),
    (["--max-len", "8", "--stride", "8"], "--stride (8) must be smaller than --max-len (8)"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--max-len", "1"], None),
])
def test_eval_errors_are_one_line(ckpt, capsys, argv, message):
    assert main(["eval", "perplexity", ckpt, "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (message is None or message in err)

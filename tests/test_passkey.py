"""Passkey retrieval: prompts, the greedy-equivalent verdict, the (length, depth) grid and the CLI;
the YaRN extension config starting from a trained model."""

from __future__ import annotations

import json

import pytest
import torch

from latentmoe.cli import main
from latentmoe.evaluation.passkey import build_prompt, evaluate_passkey, format_table, key_is_retrieved
from latentmoe.tokenizer import train_bpe
from latentmoe.train import load_config, train
from latentmoe.train.data import corpus_documents


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(corpus_documents("python-docs", max_chars=60_000), 400)


class InductionOracle(torch.nn.Module):
    """Predicts the token that followed the longest earlier match of the current suffix (up to 6
    tokens), looking back at most `window` tokens: retrieval exactly as far as the window reaches."""

    def __init__(self, vocab: int, window: int):
        super().__init__()
        self.vocab, self.window = vocab, window
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        seq = ids[0].tolist()
        logits = torch.zeros(1, len(seq), self.vocab)
        for t in range(len(seq)):
            best, nxt = 0, 0
            for s in range(max(0, t - self.window), t):
                n = 0
                while n < 6 and s - n >= 0 and seq[s - n] == seq[t - n]:
                    n += 1
                if n >= best and s + 1 <= t:
                    best, nxt = n, seq[s + 1]
            logits[0, t, nxt] = 1.0
        return logits


def test_prompt_length_and_needle_depth(tokenizer):
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = build_prompt(tokenizer, 600, depth, "48213")
        assert 520 <= len(prompt) + len(answer) <= 600
        assert tokenizer.decode(answer).strip() == "48213"
        text = tokenizer.decode(prompt)
        assert text.endswith("What is the pass key? The pass key is")
        where = text.index("The pass key is 48213") / len(text)
        assert abs(where - depth) < 0.15


def test_grid_follows_what_the_model_can_reach(tokenizer):
    vocab = tokenizer.vocab_size
    perfect = evaluate_passkey(InductionOracle(vocab, 10_000), tokenizer, [200, 400], [0.0, 1.0], trials=2)
    assert all(t.correct for t in perfect)
    # Looking back only 150 tokens: the needle at the end is found, at the start of 400 tokens it is not.
    short = evaluate_passkey(InductionOracle(vocab, 150), tokenizer, [200, 400], [0.0, 1.0], trials=2)
    got = {(t.length, t.depth): t.correct for t in short}
    assert got[(400, 1.0)] and got[(200, 1.0)] and not got[(400, 0.0)]
    table = format_table(short)
    assert "depth \\ L | 200 | 400" in table and "0.00 | " in table


def test_yarn_extension_from_a_trained_model_and_passkey_cli(tmp_path, capsys):
    base = tmp_path / "base"
    common = ["--train.max_steps", "2", "--logging.progress", "false", "--data.max_chars", "60000"]
    train(load_config("tiny", ["--run_dir", str(base)] + common), log=lambda *a: None)
    ext = tmp_path / "ext"
    cfg = load_config("yarn_extend", ["--run_dir", str(ext), "--model.init_from", str(base / "model"),
                                      "--data.corpus", "python-docs", "--train.seq_len", "128",
                                      "--train.batch_size", "2", "--train.micro_batch_size", "2",
                                      "--model.overrides.rope_scaling.original_max_position_embeddings", "64",
                                      "--optim.lr", "0"] + common)
    run = train(cfg, log=lambda *a: None)
    saved = json.loads((ext / "model" / "config.json").read_text())
    assert saved["rope_scaling"]["type"] == "yarn" and saved["rope_scaling"]["factor"] == 8.0
    assert saved["rope_scaling"]["beta_fast"] == 32 and saved["rope_scaling"]["beta_slow"] == 1
    c = run.model.config
    assert c.softmax_scale == pytest.approx(c.qk_head_dim ** -0.5 * (0.1 * 0.707 * torch.log(torch.tensor(8.0)).item() + 1) ** 2)
    # lr 0: the extended model holds the trained weights unchanged (the start was the trained model).
    from latentmoe import load_model
    a, b = load_model(base / "model").state_dict(), load_model(ext / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["eval", "passkey", str(ext / "model"), "--lengths", "96,160", "--depths", "0,1",
                 "--trials", "1", "--out", str(tmp_path / "pk")]) == 0
    res = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert res["lengths"] == [96, 160] and res["depths"] == [0.0, 1.0] and len(res["trials"]) == 4
    assert res["rope_scaling"]["factor"] == 8.0
    assert (tmp_path / "pk" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "overall:" in capsys.readouterr().out


def test_passkey_cli_errors(tmp_path, capsys):
    assert main(["eval", "passkey", str(tmp_path), "--depths", "0,2"]) == 2
    assert "--depths must lie in [0, 1]" in capsys.readouterr().err
    assert main(["eval", "passkey", str(tmp_path / "none")]) == 2
    assert "no model at" in capsys.readouterr().err


class _Windows:
    """TokenData's interface over one fixed token stream (what PasskeyMix wraps)."""
    meta, num_tokens, split = {}, 10_000, "train"

    def batch(self, batch_size, seq_len, seed_seq):
        g = torch.Generator().manual_seed(sum(seed_seq))
        xy = torch.randint(5, 300, (batch_size, seq_len + 1), generator=g)
        return xy[:, :-1].clone(), xy[:, 1:].clone()


def test_passkey_mix_ends_rows_with_retrievable_documents(tokenizer):
    from latentmoe.train.data import PasskeyMix
    plain = _Windows()
    x0, y0 = plain.batch(16, 256, [1, 2])
    x, y = PasskeyMix(plain, tokenizer, 0.0).batch(16, 256, [1, 2])
    assert torch.equal(x, x0) and torch.equal(y, y0)
    x, y = PasskeyMix(plain, tokenizer, 1.0).batch(16, 256, [1, 2])
    assert x.shape == (16, 256) and torch.equal(x[:, 1:], y[:, :-1])   # still one stream shifted by one
    oracle = InductionOracle(tokenizer.vocab_size, 10_000)
    for i in range(16):
        text = tokenizer.decode(y[i].tolist())
        key = text.rsplit("The pass key is", 1)[1].strip()
        assert len(key) == 5 and key.isdigit() and f"The pass key is {key}. Remember it." in text
        # The row's last tokens are the key, retrievable from earlier in the row (an induction model finds it).
        answer = tokenizer.encode(" " + key, add_special_tokens=False)
        row = torch.cat([x[i], y[i, -1:]]).tolist()
        assert row[-len(answer):] == answer
        assert key_is_retrieved(oracle, row[:-len(answer)], answer, "cpu")
    mixed, _ = PasskeyMix(plain, tokenizer, 0.25).batch(64, 256, [3, 4])
    changed = sum(not torch.equal(a, b) for a, b in zip(mixed, plain.batch(64, 256, [3, 4])[0]))
    assert 4 <= changed <= 30
    # max_len caps the documents (short retrieval inside long windows; here one filler sentence at most
    # beyond the needle and question): the rows keep their corpus heads.
    short = len(sum(build_prompt(tokenizer, 1, 0.5, "12345"), []))
    x, _ = PasskeyMix(plain, tokenizer, 1.0, max_len=short).batch(16, 512, [1, 2])
    x0, _ = plain.batch(16, 512, [1, 2])
    assert all(torch.equal(a[:512 - short - 8], b[:512 - short - 8]) for a, b in zip(x, x0))
    assert not all(torch.equal(a, b) for a, b in zip(x, x0))
    with pytest.raises(ValueError, match="passkey_fraction"):
        PasskeyMix(plain, tokenizer, 1.5)
    with pytest.raises(ValueError, match="passkey_max_len"):
        PasskeyMix(plain, tokenizer, 0.5, max_len=-1)
    # The same checks fail a run's config before any data is prepared.
    from latentmoe.train import load_config
    for bad in (["--data.passkey_fraction", "1.5"], ["--data.passkey_max_len", "-1"]):
        with pytest.raises(ValueError, match="passkey"):
            load_config("tiny", bad).validate()

"""`latentmoe generate` and `latentmoe chat` on a saved tiny checkpoint with a tokenizer."""

from __future__ import annotations

import io
import json

import pytest
import torch

from latentmoe.checkpoint import load_model, save_model
from latentmoe.cli import main

from test_engine import reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from latentmoe.tokenizer import train_bpe
    tok = train_bpe(["hello there, how are you today? fine thanks, and you?"] * 30, vocab_size=300)
    path = tmp_path_factory.mktemp("chat")
    tok_dir = path / "tok"
    tok.save(tok_dir)
    model = tiny_model(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_model(model, path / "model", tokenizer_dir=tok_dir)
    return path / "model", tok


def test_generate_command_matches_reference(ckpt, capsys):
    path, tok = ckpt
    rc = main(["generate", str(path), "--prompt", "hello there", "--prompt", "fine", "--max-tokens", "6",
               "--ignore-eos", "--json", "--device", "cpu", "--max-model-len", "64"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    model = load_model(path)
    for line, prompt in zip(lines, ["hello there", "fine"]):
        ids = tok.encode(prompt)
        want = reference_greedy(model, ids, 6)
        assert line["prompt_token_ids"] == ids
        assert line["outputs"][0]["token_ids"] == want
        assert line["outputs"][0]["text"] == tok.decode(want)
    # Token-id prompts from a file; a clear error for bad input.
    f = path.parent / "prompts.txt"
    f.write_text("5, 6, 7\n8 9\n")
    assert main(["generate", str(path), "--prompts-file", str(f), "--token-ids", "--max-tokens", "3",
                 "--device", "cpu", "--max-model-len", "64"]) == 0
    assert capsys.readouterr().out.count("=== prompt") == 2
    assert main(["generate", str(path), "--device", "cpu", "--max-model-len", "64"]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_chat_keeps_history_and_ctrl_c_stops_only_the_answer(ckpt, monkeypatch, capsys):
    from latentmoe.commands.chat import chat_turn
    from latentmoe.engine import LLM, SamplingParams
    path, tok = ckpt
    llm = LLM(str(path), device="cpu", max_model_len=128, block_size=4)

    class Interrupting(io.StringIO):
        pressed = False

        def write(self, s):   # the user presses Ctrl-C (once) while the second piece is printed
            if self.tell() > 0 and not self.pressed:
                self.pressed = True
                raise KeyboardInterrupt
            return super().write(s)

    messages = [{"role": "user", "content": "hello"}]
    text, reason = chat_turn(llm, messages, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                             out=Interrupting())
    assert reason == "abort" and llm.block_manager.num_used_blocks == 0 and not llm.has_unfinished()
    # The program goes on: the next answer is the full greedy one, over the whole history.
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "and you?"}]
    out = io.StringIO()
    text2, reason2 = chat_turn(llm, messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), out=out)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert reason2 == "length" and text2 == tok.decode(reference_greedy(llm.model, ids, 5)).strip()
    # The interactive loop: two turns, then Ctrl-D.
    answers = iter(["hi", "/reset", "again"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(path), "--device", "cpu", "--max-model-len", "128", "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Assistant: ") == 2 and "history cleared" in captured.err


def test_engine_options_are_checked_in_one_place(ckpt, capsys):
    # Bad engine options: a one-line error naming the option, exit code 2, for each command that takes them.
    path, _ = ckpt
    for argv, field in ((["--block-size", "0"], "block_size"), (["--kv-cache", "gqa"], "kv_cache"),
                        (["--dtype", "int8"], "dtype"), (["-tp", "0"], "tensor_parallel_size"),
                        (["-tp", "3"], "must divide num_attention_heads"),
                        (["--enable-expert-parallel"], "tensor_parallel_size > 1")):
        assert main(["generate", str(path), "--prompt", "hi", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert field in err and "Traceback" not in err
    assert main(["chat", str(path), "--device", "cpu", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_engine_options_reach_the_engine(ckpt):
    from latentmoe.cli import build_parser
    from latentmoe.commands._engine_args import build_llm
    path, _ = ckpt
    for command in ("generate", "chat", "serve"):
        argv = [command, str(path), "--device", "cpu", "--max-model-len", "64", "--block-size", "8",
                "--kv-cache", "mha", "--experts", "fused", "--fused-ops", "off", "--no-enable-prefix-caching",
                "--max-num-batched-tokens", "100", "--gpu-memory-utilization", "0.5", "--enforce-eager",
                "--prefill-hold-steps", "3", "--no-async-scheduling"]
        args = build_parser().parse_args(argv)
        llm = build_llm(args, str(path))
        cfg = llm.engine_config
        assert cfg.async_scheduling is False
        assert (cfg.block_size, cfg.kv_cache.name, cfg.experts_impl, cfg.fused_ops) == (8, "mha", "fused", False)
        assert (cfg.enable_prefix_caching, cfg.max_num_batched_tokens, llm.max_model_len) == (False, 100, 64)
        assert (cfg.gpu_memory_utilization, cfg.enforce_eager, cfg.prefill_hold_steps) == (0.5, True, 3)
    args = build_parser().parse_args(["generate", str(path), "--enable-prefix-caching"])
    assert args.async_scheduling   # on unless turned off
    assert args.enable_prefix_caching and not build_parser().parse_args(
        ["serve", str(path), "--no-prefix-caching"]).enable_prefix_caching


def test_a_missing_tokenizer_fails_before_the_weights_load(tmp_path, capsys):
    """Text prompts (generate) and chat need tokenizer.json: said before any weight is read. The weights here
    are unreadable, so an error about them would mean the engine was built first."""
    model = tiny_model()
    save_model(model, tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    assert main(["generate", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and "--token-ids" in err and "Traceback" not in err
    assert main(["chat", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and "Traceback" not in err
    # token ids need no tokenizer: they get as far as the (broken) weights
    assert main(["generate", str(tmp_path), "--prompt", "1,2", "--token-ids", "--device", "cpu"]) != 0
    assert "no tokenizer.json" not in capsys.readouterr().err


def test_serve_and_chat_take_the_interactive_budget_on_cuda(monkeypatch):
    """serve and chat default to INTERACTIVE_BUDGET tokens a step on CUDA; a budget given, or another device, is kept."""
    import argparse
    from latentmoe.commands._engine_args import INTERACTIVE_BUDGET, use_interactive_budget

    def budget(available, **kw):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        args = argparse.Namespace(**{"max_num_batched_tokens": None, "device": None, **kw})
        use_interactive_budget(args)
        return args.max_num_batched_tokens

    assert budget(True) == budget(True, device="cuda:1") == INTERACTIVE_BUDGET == 8192
    assert budget(True, max_num_batched_tokens=100) == 100
    assert budget(True, device="cpu") is None and budget(False) is None

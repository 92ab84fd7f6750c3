"""What a new user meets first: the README's own commands work as written, and mistakes end in one line that says
what to do, before anything slow (loading a model, tokenizing a corpus) has happened."""

from __future__ import annotations

import json
import os
import re
import shlex
from importlib import resources

import pytest
import torch

from latentmoe.cli import build_parser, main

from _server_helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

BUILT_IN_CONFIGS = sorted(f.name.removesuffix(".toml") for f in resources.files("latentmoe.train").joinpath(
    "configs").iterdir() if f.name.endswith(".toml"))
README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fc"), max_position_embeddings=128)


def one_line_error(capsys, contains: str) -> str:
    err = capsys.readouterr().err
    assert contains in err and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- train

@pytest.mark.parametrize("config", BUILT_IN_CONFIGS)
def test_train_refuses_to_overwrite_a_run_with_every_config(config, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--config", config, "--run_dir", str(run_dir)]) == 2
    one_line_error(capsys, "already holds a run")
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]   # refused before the corpus was read
    # Asked with --overwrite, the run starts over (the trainer is given checkpoint.overwrite).
    seen = []

    def fake_train(cfg, resume=False):
        seen.append(cfg)
        raise KeyboardInterrupt   # stop here: the config is what this test is about

    monkeypatch.setattr("latentmoe.train.train", fake_train)
    assert main(["train", "--config", config, "--run_dir", str(run_dir), "--overwrite"]) == 130
    assert seen[0].checkpoint.overwrite is True


def test_resume_without_a_checkpoint_says_so_before_tokenizing(tmp_path, capsys):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    assert main(["train", "--config", "tiny", "--run_dir", str(run_dir), "--resume"]) == 2
    one_line_error(capsys, "--resume: no checkpoint in")
    assert os.listdir(run_dir) == []   # no data/ shards: nothing was tokenized


# ---------------------------------------------------------------------- arguments checked before loading

@pytest.mark.parametrize("argv, message", [
    (["generate", "no/such/dir/x", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "no/such/dir/x", "--prompt", "hi", "--top-p", "0"], "top_p"),
    (["chat", "no/such/dir/x", "--top-k", "-5"], "top_k"),
    (["serve", "no/such/dir/x", "--port", "99999"], "--port must be in [0, 65535], got 99999"),
    (["serve", "no/such/dir/x", "--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "--device"),
    (["generate", "no/such/dir/x", "--prompt", "hi", "--device",
      "cuda" if not torch.cuda.is_available() else "cuda:99"], "--device"),
])
def test_bad_arguments_fail_in_one_line_before_loading(argv, message, capsys):
    # The checkpoint does not exist: the message is about the argument, so it was checked first.
    assert main(argv) == 2
    err = one_line_error(capsys, message)
    assert "no/such/dir" not in err


def test_busy_port_fails_before_loading(capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "no/such/dir/x", "--port", str(port)]) == 2
    one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}")


def test_generate_logprobs_without_json(ckpt, capsys):
    common = ["generate", ckpt, "--prompt", "Hello", "--max-tokens", "4", "--ignore-eos", "--logprobs", "2",
              "--device", "cpu", "--max-model-len", "64"]
    assert main(common + ["--json"]) == 0
    want = json.loads(capsys.readouterr().out)["outputs"][0]
    assert main(common) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert len(lines) == len(want["token_ids"]) == 4
    for line, tid, lp in zip(lines, want["token_ids"], want["logprobs"]):
        value = float(re.search(r"\s(-?\d+\.\d{3})(\s|$)", line).group(1))
        assert value == pytest.approx(lp[str(tid)], abs=1e-3)


# ---------------------------------------------------------------------- chat

def test_chat_unknown_command_is_not_sent(ckpt, capsys, monkeypatch):
    inputs = iter(["/foo bar", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    assert main(["chat", ckpt, "--device", "cpu", "--max-model-len", "64", "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "unknown command /foo" in err and "/reset" in err
    assert "Assistant:" not in out


def test_unknown_chat_role_is_a_400():
    from latentmoe.server.protocol import APIError, ChatCompletionRequest, parse_body
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    with pytest.raises(APIError) as e:
        parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert e.value.status == 400 and "unknown role 'robot'" in e.value.message
    for role in ("system", "developer", "user", "assistant", "tool"):
        parse_body(json.dumps({"messages": [{"role": role, "content": "x"}]}).encode(), ChatCompletionRequest)


# ---------------------------------------------------------------------- README

def test_readme_curl_uses_the_name_the_server_serves():
    text = open(README, encoding="utf-8").read()
    serving = text[text.index("## Serving"):]
    serve_line = next(ln for ln in serving.splitlines() if ln.startswith("latentmoe serve "))
    args = build_parser().parse_args(shlex.split(serve_line.split("#")[0])[1:])
    served = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    curl_models = re.findall(r'"model": "([^"]+)"', serving[:serving.index("Endpoints:")])
    assert curl_models and set(curl_models) == {served}
    assert "Bearer " + args.api_key[0] in serving

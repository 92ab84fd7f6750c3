"""Damaged checkpoints and configs explain themselves: one CheckpointError (or one CLI line) naming the file and the
problem; interrupted saves are repaired at start; --resume skips a damaged newest checkpoint; the manifest catches
any change and `train --verify` reports it."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from latentmoe import CheckpointError, build_model, get_config, load_model, save_model
from latentmoe.checkpoint import commit as commit_mod
from latentmoe.checkpoint.commit import begin, checkpoint_dirs, checkpoint_path, commit, newest_valid, recover
from latentmoe.checkpoint.integrity import MANIFEST, check_safetensors, verify
from latentmoe.config import ModelConfig
from latentmoe.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    tok.save(str(path / "tok"))
    cfg = get_config("tiny", vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1)
    save_model(build_model(cfg, seed=0), path / "model", tokenizer_dir=str(path / "tok"))
    return path / "model"


def damaged(src, dst, how: str):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    if how == "half":
        data = data[:len(data) // 2]
    elif how == "minus_one_byte":
        data = data[:-1]
    elif how == "empty":
        data = b""
    elif how == "bad_header":
        data = struct.pack("<Q", 40) + b"{this is not json" + b" " * 23 + data[48:]
    elif how == "huge_header_length":
        data = struct.pack("<Q", 2**60) + data[8:]
    f.write_bytes(data)
    return dst


CASES = {"half": "truncated", "minus_one_byte": "truncated", "empty": "empty", "bad_header": "corrupt",
         "huge_header_length": "truncated or corrupt"}


@pytest.mark.parametrize("how", list(CASES))
def test_damaged_safetensors_named(good_dir, tmp_path, how):
    d = damaged(good_dir, tmp_path / "m", how)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg and CASES[how] in msg and "\n" not in msg
    assert verify(str(d)) == [msg]


def test_trailing_bytes_and_good_file(good_dir, tmp_path):
    check_safetensors(str(good_dir / "model.safetensors"))   # a whole file passes
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="trailing bytes"):
        load_model(d)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "latentmoe", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_cli_generate_and_serve_name_the_damaged_file(good_dir, tmp_path):
    d = damaged(good_dir, tmp_path / "m", "minus_one_byte")
    one_line_error(cli("generate", d, "--prompt", "hi", "--device", "cpu"), "model.safetensors", "truncated")
    one_line_error(cli("serve", d, "--device", "cpu", "--port", "1"), "model.safetensors", "truncated")


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "kv_lora_rank"])
def test_config_missing_required_field_named(good_dir, tmp_path, field):
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"missing required field\\(s\\) {field}"):
        load_model(d)


@pytest.mark.parametrize("content,needle", [("[1, 2]", "must hold a JSON object, not a list"),
                                            ("{oops", "not valid JSON"),
                                            (None, "unknown torch_dtype 'float99'")])
def test_config_file_problems_one_line(good_dir, tmp_path, content, needle):
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    if content is None:
        cfg = json.loads((d / "config.json").read_text())
        content = json.dumps({**cfg, "torch_dtype": "float99"})
    (d / "config.json").write_text(content)
    with pytest.raises(ValueError, match="config.json: " + needle.replace("(", "\\(")):
        ModelConfig.from_json(d)
    if needle.startswith("must"):
        one_line_error(cli("generate", d, "--prompt", "hi", "--device", "cpu"), "config.json", needle)


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{not json"), ("tokenizer.json", '{"model": 5}'),
                                          ("tokenizer_config.json", "[]"), ("tokenizer_config.json", "{")])
def test_corrupt_tokenizer_files_named(good_dir, tmp_path, name, content):
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    (d / name).write_text(content)
    with pytest.raises(ValueError, match=name):
        Tokenizer.from_dir(d)


def test_cli_corrupt_tokenizer_one_line(good_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    (d / "tokenizer.json").write_text("{not json")
    one_line_error(cli("generate", d, "--prompt", "hi", "--device", "cpu"), "tokenizer.json", "corrupt")


# ------------------------------------------------------------------ run directories


def _stage(run_dir, step, marker="x"):
    final = checkpoint_path(run_dir, step)
    tmp = begin(final)
    os.makedirs(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", "weights.bin"), "w") as f:
        f.write(marker * 100)
    torch.save({"step": step}, os.path.join(tmp, "trainer_state.pt"))
    return final


def test_manifest_written_last_and_verify_catches_changes(tmp_path):
    run = str(tmp_path)
    final = commit(run, _stage(run, 1), keep=0)
    manifest = json.loads(open(os.path.join(final, MANIFEST)).read())["files"]
    assert sorted(manifest) == [os.path.join("model", "weights.bin"), "trainer_state.pt"]
    assert manifest[os.path.join("model", "weights.bin")]["size"] == 100
    assert verify(final) == []
    weights = os.path.join(final, "model", "weights.bin")
    with open(weights, "r+") as f:
        f.write("y")   # same size, other content
    assert "SHA-256" in verify(final)[0]
    with open(weights, "a") as f:
        f.write("more")
    assert "the manifest says 100" in verify(final)[0]
    os.remove(weights)
    assert verify(final)[0].endswith("missing")


def test_commit_syncs_files_and_dirs_before_rename(tmp_path, monkeypatch):
    run = str(tmp_path)
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(commit_mod.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(commit_mod.os, "rename", lambda a, b: events.append(("rename", a)) or real_rename(a, b))
    final = _stage(run, 1)
    staging = commit_mod.staging_path(final)
    commit(run, final, keep=0)
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced = {p for kind, p in events[:first_rename] if kind == "fsync"}
    for p in (os.path.join(staging, "model", "weights.bin"), os.path.join(staging, "trainer_state.pt"),
              os.path.join(staging, MANIFEST), staging, os.path.join(staging, "model")):
        assert os.path.realpath(p) in synced, p
    assert events[first_rename] == ("rename", staging)


def test_recover_after_kill_between_the_two_renames(tmp_path):
    run = str(tmp_path)
    commit(run, _stage(run, 1, "a"), keep=0)
    commit(run, _stage(run, 2, "b"), keep=0)
    # a re-save of step 2 killed after its first rename: step-2 moved aside, the new one still staged
    _stage(run, 2, "c")
    root = os.path.join(run, "checkpoints")
    os.rename(os.path.join(root, "step-000002"), os.path.join(root, ".old-step-000002"))
    link = os.path.join(run, "model")
    assert not os.path.exists(link)   # dangling
    _stage(run, 3, "d")   # and a save that never committed
    recover(run)
    assert sorted(os.listdir(root)) == ["step-000001", "step-000002"]
    assert open(os.path.join(link, "weights.bin")).read() == "b" * 100
    assert verify(os.path.join(root, "step-000002")) == []


def test_newest_valid_skips_damaged_with_warning(tmp_path):
    run = str(tmp_path)
    commit(run, _stage(run, 1, "a"), keep=0)
    second = commit(run, _stage(run, 2, "b"), keep=0)
    with open(os.path.join(second, "model", "weights.bin"), "r+") as f:
        f.truncate(50)
    warnings = []
    assert newest_valid(run, warn=warnings.append) == checkpoint_dirs(run)[0]
    assert len(warnings) == 1 and second in warnings[0] and "weights.bin" in warnings[0]


def test_resume_falls_back_and_verify_cli(tmp_path):
    """A real run: its newest checkpoint truncated, --resume continues from the previous one with a warning;
    `train --verify` names the damaged file and exits 1."""
    from latentmoe.train import load_config, train

    data = str(tmp_path / "data")
    over = {"run_dir": str(tmp_path / "run"), "data.cache_dir": data, "data.max_chars": 20000, "data.vocab_size": 300,
            "train.seq_len": 16, "train.micro_batch_size": 2, "train.batch_size": 2, "train.max_steps": 2,
            "train.tokens": 0, "checkpoint.interval": 1, "checkpoint.keep": 3, "logging.progress": False,
            "logging.eval_interval": 0, "precision.threads": 1, "precision.device": "cpu",
            "model.overrides.num_hidden_layers": 1}
    train(load_config("tiny", over), log=lambda *a: None)
    ckpts = checkpoint_dirs(str(tmp_path / "run"))
    assert [os.path.basename(c) for c in ckpts] == ["step-000001", "step-000002"]
    weights = os.path.join(ckpts[-1], "model", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 1)

    r = cli("train", "--config", "tiny", *[a for k, v in over.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v))], "--verify")
    assert r.returncode == 1 and "step-000002: DAMAGED" in r.stdout and "model.safetensors" in r.stdout
    assert "step-000001: ok" in r.stdout

    lines = []
    run = train(load_config("tiny", {**over, "train.max_steps": 3}), resume=True, log=lambda *a: lines.append(a[0]))
    assert any("warning: skipping damaged checkpoint" in str(line) and "step-000002" in str(line) for line in lines)
    assert any("resumed from" in str(line) and "step-000001" in str(line) for line in lines)
    assert run.step == 3
    assert verify(checkpoint_dirs(str(tmp_path / "run"))[-1]) == []

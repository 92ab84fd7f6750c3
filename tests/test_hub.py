"""Hub model ids: resolved through huggingface_hub's cache (HF_HUB_CACHE, HF_HUB_OFFLINE, revisions), only the
checkpoint's files asked for, and one clear line for ids that cannot be had. No network: the cache is laid out here
with huggingface_hub's own helpers and checked by its own scanner."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name
from huggingface_hub.utils import filter_repo_objects

from latentmoe.checkpoint import load_model, resolve_checkpoint
from latentmoe.checkpoint.hub import HUB_PATTERNS, is_hub_id
from latentmoe.cli import main

from _server_helpers import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "acme/tiny-v2"
MAIN, V1 = "a" * 40, "b" * 40
# What a released repository holds besides the checkpoint: none of it may be needed.
EXTRAS = {"README.md": b"# tiny", "pytorch_model.bin": b"duplicate weights", "modeling_deepseek.py": b"code"}


def _put_snapshot(storage: str, commit: str, files: dict[str, bytes], listed: dict[str, bytes]) -> None:
    """Blobs + snapshot symlinks for `files`; the tree listing of the commit names `listed` (what the hub has)."""
    for name, data in files.items():
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        dst = os.path.join(storage, "snapshots", commit, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _create_symlink(blob, dst)
    write_tree_cache(storage, commit, {n: TreeCacheEntry(size=len(d), blob_id=hashlib.sha1(d).hexdigest())
                                       for n, d in listed.items()})


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache with REPO at `main` (commit MAIN) and tag `v1` (commit V1, other weights): only the checkpoint
    files were fetched, the hub's listing also has EXTRAS."""
    root = tmp_path_factory.mktemp("hub")
    cache = os.fspath(root / "cache")
    storage = os.path.join(cache, repo_folder_name(repo_id=REPO, repo_type="model"))
    for commit, ref, seed in ((MAIN, "main", 0), (V1, "v1", 1)):
        src = make_checkpoint(root / f"src{seed}", seed=seed)
        files = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src) if os.path.isfile(
            os.path.join(src, n))}
        _put_snapshot(storage, commit, files, {**files, **EXTRAS})
        _cache_commit_hash_for_specific_revision(storage, ref, commit)
        shutil.rmtree(src)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    # The same settings the environment variables give (huggingface_hub reads them once, at import).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_cache_is_what_huggingface_hub_sees(hub_cache):
    info = scan_cache_dir(hub_cache)
    (repo,) = info.repos
    assert repo.repo_id == REPO
    assert {r.commit_hash: sorted(r.refs) for r in repo.revisions} == {MAIN: ["main"], V1: ["v1"]}


def test_only_checkpoint_files_are_fetched():
    released = ["config.json", "configuration_deepseek.py", "modeling_deepseek.py", "generation_config.json",
                "model-00001-of-000004.safetensors", "model-00004-of-000004.safetensors",
                "model.safetensors.index.json", "pytorch_model.bin", "README.md", "LICENSE", "figures/arch.png",
                "tokenizer.json", "tokenizer_config.json"]
    assert sorted(filter_repo_objects(released, allow_patterns=HUB_PATTERNS)) == [
        "config.json", "generation_config.json", "model-00001-of-000004.safetensors",
        "model-00004-of-000004.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json"]


def test_hub_id_resolves_offline_to_the_cached_revision(offline):
    storage = os.path.join(offline, repo_folder_name(repo_id=REPO, repo_type="model"))
    # The snapshots lack EXTRAS, which the hub lists: resolution works only because just the checkpoint's files
    # are asked for (asking for everything would find the snapshot incomplete).
    assert resolve_checkpoint(REPO) == os.path.join(storage, "snapshots", MAIN)
    assert resolve_checkpoint(REPO, revision="v1") == os.path.join(storage, "snapshots", V1)
    assert resolve_checkpoint(REPO, revision=V1) == os.path.join(storage, "snapshots", V1)
    main_model, v1_model = load_model(REPO), load_model(REPO, revision="v1")
    ids = torch.tensor([[1, 5, 9]])
    assert not torch.equal(main_model(ids), v1_model(ids))
    ref = load_model(os.path.join(storage, "snapshots", V1))
    torch.testing.assert_close(v1_model(ids), ref(ids), rtol=0, atol=0)


def test_kv_report_takes_a_hub_id(offline, capsys):
    from latentmoe.config import ModelConfig
    from latentmoe.kv_report import format_report
    assert main(["kv-report", REPO, "--context", "128"]) == 0
    storage = os.path.join(offline, repo_folder_name(repo_id=REPO, repo_type="model"))
    cfg = ModelConfig.from_json(os.path.join(storage, "snapshots", MAIN))
    assert capsys.readouterr().out.strip() == format_report(cfg, 128, 1, 2, name=REPO).strip()


def test_generate_and_llm_take_a_hub_id(offline, capsys):
    from latentmoe.engine import LLM
    llm = LLM(REPO, device="cpu", max_model_len=64)
    assert llm.tokenizer is not None
    assert main(["generate", REPO, "--revision", "v1", "--prompt", "Hello", "--max-tokens", "3", "--ignore-eos",
                 "--device", "cpu", "--max-model-len", "64"]) == 0
    assert "=== prompt: 'Hello'" in capsys.readouterr().out


@pytest.mark.parametrize("name, revision, expected", [
    ("acme/unknown-model", None, "hub model acme/unknown-model is not (completely) in the hub cache while the hub "
                                 "cannot be reached"),
    (REPO, "v2", "hub model acme/tiny-v2 at revision 'v2' is not (completely) in the hub cache"),
    ("./no/such/dir", None, "checkpoint directory not found: ./no/such/dir"),
    ("runs/x/model", None, "checkpoint directory not found: runs/x/model"),
])
def test_unavailable_checkpoints_are_one_line(offline, capsys, name, revision, expected):
    argv = ["generate", name, "--prompt", "hi", "--device", "cpu"] + (["--revision", revision] if revision else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_revision_on_a_local_directory_is_refused(tmp_path, capsys):
    assert main(["generate", os.fspath(tmp_path), "--revision", "v1", "--prompt", "hi"]) == 2
    assert "--revision applies to hub model ids" in capsys.readouterr().err


def test_hub_errors_are_one_line(monkeypatch):
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://hub.invalid/api/models/x"))
    cases = [(errors.GatedRepoError("gated", response=response), "is a gated model: accept its terms"),
             (errors.RepositoryNotFoundError("nope", response=response), "no model 'acme/x' on the hub"),
             (errors.RevisionNotFoundError("nope", response=response), "has no revision 'dev'")]
    for error, expected in cases:
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
        with pytest.raises(FileNotFoundError, match=expected) as info:
            resolve_checkpoint("acme/x", revision="dev")
        assert "\n" not in str(info.value)


def test_hub_id_shapes():
    assert is_hub_id("deepseek-ai/DeepSeek-V2-Lite") and is_hub_id("gpt2")
    assert not any(map(is_hub_id, ["runs/demo/model", "./model", "../x", "/abs/path", "~/m", "a/../b"]))


class FakeHub:
    """The hub's HTTP API for one repository (what snapshot_download calls: revision info, tree listing, resolve),
    on a local port; unknown repositories answer 404 and `acme/gated` as a gated one does. Records every request."""

    def __init__(self, files: dict[str, bytes]):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.requests: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path))
                listing = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                           for f, d in files.items()]
                if path.startswith(f"/api/models/{REPO}/revision/"):
                    body = {"id": REPO, "sha": MAIN, "siblings": [{"rfilename": f} for f in files]}
                    return self._answer(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if path.startswith(f"/api/models/{REPO}/tree/"):
                    return self._answer(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
                if path.startswith(f"/{REPO}/resolve/{MAIN}/"):
                    data = files[path.rsplit("/", 1)[1]]
                    return self._answer(200, data, {"X-Repo-Commit": MAIN,
                                                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
                if "acme/gated" in path:
                    return self._answer(403, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
                return self._answer(404, b"{}", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "not found"})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fetched(self) -> set[str]:
        return {p.rsplit("/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p}


def test_download_fetches_only_the_checkpoint_then_works_offline(tmp_path):
    """The real download path against a local stand-in for the hub (HF_ENDPOINT), in fresh processes: only the
    checkpoint's files are fetched, with a progress bar; then HF_HUB_OFFLINE=1 runs from the cache; unknown and
    gated ids are one line each."""
    src = make_checkpoint(tmp_path / "src")
    files = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src) if os.path.isfile(
        os.path.join(src, n))}
    hub = FakeHub({**files, **EXTRAS})
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        cmd = [sys.executable, "-m", "latentmoe", "generate", REPO, "--device", "cpu", "--max-model-len", "64",
               "--max-tokens", "2", "--prompt", "Hi"]
        online = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert online.returncode == 0, online.stderr
        assert "Fetching" in online.stderr   # huggingface_hub's progress bar
        assert hub.fetched() == set(files) and not hub.fetched() & set(EXTRAS)
        hub.requests.clear()
        offline = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                                 timeout=120)
        assert offline.returncode == 0, offline.stderr
        assert offline.stdout == online.stdout and hub.requests == []
        for repo, message in (("acme/missing", "no model 'acme/missing' on the hub"),
                              ("acme/gated", "acme/gated is a gated model")):
            bad = subprocess.run(cmd[:4] + [repo] + cmd[5:], env=env, capture_output=True, text=True, timeout=120)
            assert bad.returncode == 2 and message in bad.stderr, bad.stderr
            assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    finally:
        hub.server.shutdown()

"""The `latentmoe` CLI: kv-report numbers from the report and `init` writing loadable checkpoints."""

import subprocess
import sys

import torch

from latentmoe import get_config, load_model
from latentmoe.cli import main
from latentmoe.kv_report import cache_rows


def test_kv_report_numbers_of_the_released_models(capsys):
    mla, mha = cache_rows(get_config("deepseek-v2-lite"))[:2]
    assert mla.name.startswith("MLA") and mha.name.startswith("MHA")
    assert mla.elements_per_token == 15552 and mha.elements_per_token == 110592  # report Table 9: 15.6K vs 110.6K
    assert cache_rows(get_config("deepseek-v2"))[0].elements_per_token == 34560
    assert main(["kv-report", "deepseek-v2-lite", "--context", "1024", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "15,552" in out and "110,592" in out
    # 15,552 elements * 2 bytes * 1024 tokens * 2 sequences = 60.75 MiB
    assert "60.8 MiB" in out


def test_init_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init", "tiny", str(out), "--set", "num_hidden_layers=2", "--seed", "3"]) == 0
    model = load_model(out)
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 4096)
    # refuses to overwrite without --force, with a message instead of a traceback
    assert main(["init", "tiny", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "latentmoe", "kv-report", "tiny"], capture_output=True, text=True)
    assert res.returncode == 0 and "MLA" in res.stdout
    res = subprocess.run([sys.executable, "-m", "latentmoe", "kv-report", "no-such-model"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown model" in res.stderr

"""bench/reproduce.py: the paper-table harness runs end to end on the tiny model (both experiments), and its
confidence interval is the Wilson interval."""
import importlib.util
import json
import os

import pytest

from conftest import ROOT, run_cli

spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_wilson_interval_known_values():
    lo, hi = reproduce.wilson(0, 4)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(48.99, abs=0.01)
    lo, hi = reproduce.wilson(5, 10)  # symmetric around 50: 23.66 .. 76.34
    assert (lo, hi) == (pytest.approx(23.66, abs=0.01), pytest.approx(76.34, abs=0.01))


def test_one_shot_pipeline_on_tiny_model(tiny_model_dir, data_dir, tmp_path):
    proc = run_cli("bench/reproduce.py", "one-shot", "--model", tiny_model_dir, "--data-dir", data_dir,
                   "--benchmarks", "gsm8k,amc23", "--limit", "3", "--max-new-tokens", "8", "--logit-stats",
                   "--select", os.path.join(data_dir, "dsr_sub.parquet"),
                   "--select-args=--limit 4 --k 2 --max-new-tokens 8 --score entropy",
                   "--train-args=--max-steps 1 --batch-size 4 --max-new-tokens 8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| amc23 (n=3) |" in proc.stdout and "44.1 | 70.3 |" in proc.stdout  # ours next to the paper's
    assert "skew (pooled top-k)" in proc.stdout
    # base and EM histograms on one figure, only when matplotlib happens to be installed
    assert (tmp_path / "logit_shift.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    # it trained on the prompt select_prompt.py chose, and evaluated the checkpoint it wrote
    with open(tmp_path / "train" / "step_1" / "train_args.json") as f:
        assert json.load(f)["args"]["data"] == str(tmp_path / "prompt.jsonl")
    res = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["benchmark"] for r in res["rows"]] == ["gsm8k", "amc23"] and res["rows"][0]["base"][1] == 3


def test_em_inf_pipeline_on_tiny_model(tiny_model_dir, data_dir, tmp_path):
    proc = run_cli("bench/reproduce.py", "em-inf", "--model", tiny_model_dir, "--data-dir", data_dir,
                   "--benchmarks", "gsm8k", "--limit", "2", "--max-new-tokens", "8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| gsm8k (n=2) |" in proc.stdout and "| average |" in proc.stdout


def test_failing_step_is_one_line(data_dir, tmp_path):
    proc = run_cli("bench/reproduce.py", "one-shot", "--model", "/nonexistent/model", "--data-dir", data_dir,
                   "--benchmarks", "gsm8k", "--limit", "1", "--out", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "step failed" in proc.stderr and "model path does not exist" in proc.stderr

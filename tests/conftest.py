"""Shared fixtures: a tiny random Qwen2 model + tokenizer built offline, and the real benchmark files.

Every script's tests reuse `tiny_model_dir` (a Hugging Face folder on disk, so the CLIs load it exactly as they
load a hub model) and `tiny` (the loaded model and tokenizer, fp32 on CPU).
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tiny_model import build_tiny_model  # noqa: E402

# The real benchmark files live beside the checkout (../shared/benchmarks); EM_DATA_DIR overrides.
DATA_DIR = os.environ.get("EM_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "benchmarks"))

# Tiny models are dominated by per-op overhead: one thread is several times faster than two on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(DATA_DIR):
        pytest.fail(f"benchmark files not found at {DATA_DIR}; set EM_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from evaluate import load_model
    model, tokenizer = load_model(tiny_model_dir)
    return model, tokenizer


def run_cli(*args, timeout=600):
    """Run a repo script as a user would; returns CompletedProcess (text)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_one_line_error(proc, *needles):
    """Bad input must give a clear line and a non-zero exit, never a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr

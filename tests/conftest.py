"""Shared fixtures: a tiny random Qwen2 model + tokenizer built offline, and the real benchmark files.

Every script's tests reuse `tiny_model_dir` (a Hugging Face folder on disk, so the CLIs load it exactly as they
load a hub model) and `tiny` (the loaded model and tokenizer, fp32 on CPU).

Benchmark data: `data_dir` is tests/data, verbatim excerpts of the real benchmark files under their own file names
(a few rows each; tests/data/README.md lists the rows, their source and licence), so every test runs from a plain
clone. `full_data_dir` is a folder with the whole files ($EM_DATA_DIR), for the few checks that need every row
(row counts, all the golds of a kind in a file); without it those tests are skipped, or fail when
EM_REQUIRE_FULL_DATA=1 (CI, which must not pass on skips). `each_data_dir` runs a test on both.
"""
import json
import os
import sys

import pytest

# CPU only, by design: the GPU is hidden before torch loads, here and in every script the tests start (they inherit
# this environment), so no outcome depends on the machine. The GPU checks live in bench/gpu.sh.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

assert not torch.cuda.is_available(), "tests must not see a GPU (CUDA_VISIBLE_DEVICES was set too late)"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tiny_model import build_parrot_model, build_tiny_model, write_parrot_benchmarks  # noqa: E402

# Excerpts of the real benchmark files, shipped with the repo.
DATA_DIR = os.path.join(ROOT, "tests", "data")
# The whole files, when this machine has them. Taken out of the environment: the scripts default --data-dir to
# $EM_DATA_DIR, and no test may read the whole files without asking for full_data_dir.
FULL_DATA_DIR = os.environ.pop("EM_DATA_DIR", None)
NO_FULL_DATA = "whole benchmark files not available: set EM_DATA_DIR to a folder with the full files"

# --dtype auto picks bf16 on CPUs with native bf16 and fp32 elsewhere: pin fp32 (in-process and in every CLI run) so
# that no test outcome depends on the CPU that runs it.
os.environ["EM_DTYPE"] = "float32"
# The scripts' --engine auto takes vLLM where it is installed (CI's vLLM pass): tests and every CLI they start use
# HF generate unless they ask for vLLM (tests/test_vllm.py).
os.environ["EM_ENGINE"] = "static"

# Tiny models are dominated by per-op overhead: one thread is several times faster than two on 2 cores.
torch.set_num_threads(1)

# Prompts of different lengths, for batches whose rows must not line up.
PROMPTS = ["What is 2+3?", "Compute the sum of 12345 and 678, then divide the result by 3 and report it.",
           "Find x if 3x + 5 = 20.", "The pressure P exerted by wind on a sail varies jointly as the area A.",
           "Janet's ducks lay 16 eggs per day.", "What is 1/2 + 1/3?", "Compute 2^{10}.",
           "Let us think step by step about the interval [-2, 7] and the point (3, pi/2)."]


@pytest.fixture(autouse=True)
def repo_left_as_found():
    """Tests write under their tmp_path only: a script run without --out would leave its default output folder
    (eval_out/, checkpoints/, em_ft_out/, prompt.jsonl) in the user's clone."""
    before = set(os.listdir(ROOT))
    yield
    new = set(os.listdir(ROOT)) - before - {".pytest_cache", "__pycache__"}
    assert not new, f"the test wrote {sorted(new)} into the repo"


@pytest.fixture(scope="session")
def data_dir():
    """tests/data: a few real rows of each benchmark file, under the same file names as the whole files."""
    return DATA_DIR


@pytest.fixture(scope="session")
def full_data_dir():
    """$EM_DATA_DIR, the folder with the whole benchmark files; skips the test without it (fails instead when
    EM_REQUIRE_FULL_DATA=1)."""
    if FULL_DATA_DIR and os.path.isdir(FULL_DATA_DIR):
        return FULL_DATA_DIR
    reason = NO_FULL_DATA + (f" ({FULL_DATA_DIR} is not a folder)" if FULL_DATA_DIR else "")
    if os.environ.get("EM_REQUIRE_FULL_DATA") == "1":
        pytest.fail(reason + " (EM_REQUIRE_FULL_DATA=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=["excerpts", "whole files"])
def each_data_dir(request):
    """The test once on the excerpts and once on the whole files: checks that hold for every row of a file."""
    return request.getfixturevalue("data_dir" if request.param == "excerpts" else "full_data_dir")


SOURCE_IDS = ("unique_id", "id", "idx", "extra_info.index")  # a row's own id, whichever field its file has


def source_position(path, key):
    """Position in a benchmark file of the row whose own id (MATH500's unique_id, AMC/AIME/OlympiadBench's id,
    Minerva/GSM8K's idx, DeepScaleR's extra_info.index) is `key`. Tests name rows by these ids, the same in the
    excerpts and in the whole files, not by position (the loader numbers rows without an id by position)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        for field in SOURCE_IDS:
            value = row
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None and value == key:
                return i
    raise LookupError(f"{path}: no row with id {key!r}")


def benchmark_row(folder, name, key):
    """The loaded row (evaluate.load_benchmark) of benchmark `name` -- or file `name` in `folder` -- whose own id
    is `key` (see source_position)."""
    import evaluate
    fname = evaluate.BENCHMARKS[name][0] if name in evaluate.BENCHMARKS else name
    path = os.path.join(folder, fname)
    rows = evaluate.load_benchmark(name, folder) if name in evaluate.BENCHMARKS else evaluate.load_benchmark(path)
    return rows[source_position(path, key)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from evaluate import load_model
    model, tokenizer = load_model(tiny_model_dir)
    return model, tokenizer


def aim_eos(model_dir, out):
    """The model of model_dir with its EOS row of lm_head (tied: the embedding's too) aimed at the hidden states, so
    sampled responses end early at varied lengths (the plain tiny model almost never emits EOS); written to out.
    Tied: at the mean state of the prompts' last positions, 3 below the top logit. Untied (its head does not carry
    the input embedding): at the mean state of sampled response positions, 8 below the top logit."""
    from evaluate import build_prompt, generate_batch, load_model
    model, tok = load_model(model_dir)
    with torch.no_grad():
        prompts = [build_prompt(tok, q, "chat") for q in PROMPTS]
        if model.config.tie_word_embeddings:
            h, margin = model.model(**tok(prompts, return_tensors="pt", padding=True)).last_hidden_state[:, -1], 3
        else:
            outs = generate_batch(model, tok, prompts, 24, 1.0, seed=0)
            h, margin = torch.cat([model.model(torch.tensor([tok(p).input_ids + o["ids"]])).last_hidden_state[
                0, -len(o["ids"]):] for p, o in zip(prompts, outs)]), 8
        top = model.lm_head(h).max(-1).values.mean()
        mean = h.mean(0)
        model.lm_head.weight[tok.eos_token_id] = mean / mean.norm() * (top - margin) / mean.norm()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def eos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model (tied embedding = lm_head) with responses that end early (aim_eos)."""
    return aim_eos(tiny_model_dir, str(tmp_path_factory.mktemp("eos_tiny")))


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory):
    """The tiny model with an lm_head of its own (tie_word_embeddings=False, as Qwen2.5-Math-7B)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("untied_tiny")), tied=False)


@pytest.fixture(scope="session")
def untied_eos_model_dir(untied_model_dir, tmp_path_factory):
    """The untied tiny model with responses that end early (aim_eos)."""
    return aim_eos(untied_model_dir, str(tmp_path_factory.mktemp("untied_eos_tiny")))


@pytest.fixture(scope="session")
def parrot_data_dir(tmp_path_factory):
    """Benchmark files of our own under tests/data's names and schemas (gsm8k, amc23, mbpp, kk, leetcode,
    livecodebench; a --data-dir) whose golds and tests the parrot's greedy answer meets on some rows and misses on the
    others (tiny_model.PARROT_RIGHT), so that accuracies are neither 0 of n nor n of n."""
    return write_parrot_benchmarks(str(tmp_path_factory.mktemp("parrot_data")))


@pytest.fixture(scope="session")
def parrot_model_dir(parrot_data_dir, tmp_path_factory):
    """The tiny model fine-tuned (~30 s) to answer every prompt the tests send about parrot_data_dir's problems with
    one mixture of responses (tiny_model.PARROT_RESPONSES): greedy decoding gives the first, which is right on some
    rows of each file; sampling at T=1 mixes in a wrong boxed answer and no answer. Checked before use."""
    return build_parrot_model(str(tmp_path_factory.mktemp("parrot")), parrot_data_dir)


def is_correct(response, gold, fallback=False):
    """A math response graded as evaluate.py grades it: its extracted answer against the gold."""
    import evaluate
    return evaluate.grade_answer(evaluate.extract_answer(response, fallback), gold)[0]


def record_generate(monkeypatch):
    """evaluate.generate_batch wrapped for a test: every (prompt, record) it returns goes on the list returned."""
    import evaluate
    made, real = [], evaluate.generate_batch

    def recorded(model, tokenizer, prompts, *args, **kwargs):
        outs = real(model, tokenizer, prompts, *args, **kwargs)
        made.extend(zip(prompts, outs))
        return outs
    monkeypatch.setattr(evaluate, "generate_batch", recorded)
    return made


def run_cli(*args, timeout=600):
    """Run a repo script as a user would; returns CompletedProcess (text)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def run_torchrun(*args):
    """A script under `torchrun --nproc_per_node=2` (gloo on the CPU). The time limit turns a collective deadlock
    into a failure instead of a hung CI run."""
    return run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, timeout=300)


def assert_one_line_error(proc, *needles):
    """Bad input must give a clear line and a non-zero exit, never a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr

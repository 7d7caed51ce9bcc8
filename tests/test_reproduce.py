"""bench/reproduce.py: the paper-table harness runs end to end (every experiment) on the parrot, a tiny model trained
to give one answer that is right on some rows of its benchmark files and wrong on the others (conftest.py), so the
accuracies are neither 0 of n nor n of n; what it prints is recomputed from the samples it wrote (accuracies, Wilson
intervals as the roots of the score equation, averages), and its confidence interval is the Wilson interval."""
import importlib.util
import json
import math
import os
import re

import pytest

from conftest import ROOT, run_cli
from tiny_model import parrot_right

spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_wilson_interval_known_values():
    lo, hi = reproduce.wilson(0, 4)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(48.99, abs=0.01)
    lo, hi = reproduce.wilson(5, 10)  # symmetric around 50: 23.66 .. 76.34
    assert (lo, hi) == (pytest.approx(23.66, abs=0.01), pytest.approx(76.34, abs=0.01))


def wilson_roots(k, n, z=1.96):
    """The Wilson score interval the other way: the p with (k/n - p)^2 = z^2 p (1 - p) / n, roots of a quadratic."""
    a, b, c = 1 + z * z / n, -(2 * k / n + z * z / n), (k / n) ** 2
    d = math.sqrt(b * b - 4 * a * c)
    return 100 * (-b - d) / (2 * a), 100 * (-b + d) / (2 * a)


def first_sample_counts(samples_file, bench, mode=None):
    """(correct, problems) over sample 0 of each problem of bench (and em_inf.py mode), read from samples.jsonl."""
    with open(samples_file) as f:
        rows = [s for s in map(json.loads, f) if s["benchmark"] == bench and s.get("mode") == mode]
    first = [s for s in rows if s["sample"] == 0]
    assert len({s["id"] for s in first}) == len(first) == len({s["id"] for s in rows})  # one per problem
    return sum(s["correct"] for s in first), len(first)


def printed_row(stdout, bench, n):
    """The cells of the table row of bench: [(accuracy, lo, hi) or the raw cell]."""
    line = next(x for x in stdout.splitlines() if x.startswith(f"| {bench} (n={n}) |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    return [tuple(map(float, m.groups())) if (m := re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", c)) else c for c in cells]


def assert_cell(cell, k, n):
    lo, hi = wilson_roots(k, n)
    assert cell == (pytest.approx(100 * k / n, abs=0.051), pytest.approx(lo, abs=0.051), pytest.approx(hi, abs=0.051))


def test_one_shot_pipeline_on_tiny_model(parrot_model_dir, parrot_data_dir, data_dir, tmp_path):
    # the parrot's greedy answer is right on 2 of the first 3 rows of gsm8k and mbpp, 1 of 3 of amc23 and kk (its
    # response is 29 tokens: a budget of 32); the one EM update (lr 2e-5) leaves its answer as it is
    proc = run_cli("bench/reproduce.py", "one-shot", "--model", parrot_model_dir, "--data-dir", parrot_data_dir,
                   "--benchmarks", "gsm8k,amc23", "--limit", "3", "--max-new-tokens", "32", "--logit-stats",
                   "--select", os.path.join(data_dir, "dsr_sub.parquet"),
                   "--select-args=--limit 4 --k 2 --max-new-tokens 8 --score entropy",
                   "--train-args=--max-steps 1 --batch-size 4 --max-new-tokens 8", "--with-code", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| amc23 (n=3) |" in proc.stdout and "44.1 | 70.3 |" in proc.stdout  # ours next to the paper's
    for bench, paper in (("mbpp-378", "48.9 | 65.1 |"), ("kk", "1.0 | 17.4 |")):  # One-shot EM's code and logic
        cells = printed_row(proc.stdout, bench, 3)
        base, em = (first_sample_counts(tmp_path / f"eval_{t}_code" / "samples.jsonl", bench) for t in ("base", "em"))
        assert base == em == parrot_right(bench, 3)  # graded by running the program / reading the roles
        assert_cell(cells[0], *base)
        assert_cell(cells[2], *em)
        assert float(cells[3]) == pytest.approx(100 * (em[0] - base[0]) / 3, abs=0.051)
        assert paper in proc.stdout and "OpenCodeEval protocol" in proc.stdout
    assert "skew (pooled top-k)" in proc.stdout
    # base and EM histograms on one figure, only when matplotlib happens to be installed
    assert (tmp_path / "logit_shift.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    # it trained on the prompt select_prompt.py chose, and evaluated the checkpoint it wrote
    with open(tmp_path / "train" / "step_1" / "train_args.json") as f:
        assert json.load(f)["args"]["data"] == str(tmp_path / "prompt.jsonl")
    res = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["benchmark"] for r in res["rows"]] == ["gsm8k", "amc23", "mbpp-378", "kk"]
    # every number printed, recomputed from the samples the two evaluations wrote, whose counts are the parrot's
    for row, bench in zip(res["rows"], ["gsm8k", "amc23"]):
        base = first_sample_counts(tmp_path / "eval_base" / "samples.jsonl", bench)
        em = first_sample_counts(tmp_path / "eval_em" / "samples.jsonl", bench)
        assert base == em == parrot_right(bench, 3) and (row["base"], row["em"]) == (list(base), list(em))
        fewshot = first_sample_counts(tmp_path / "eval_base_fewshot" / "samples.jsonl", bench)
        assert fewshot == parrot_right(bench, 3)  # the same answer after the few-shot prompt
        cells = printed_row(proc.stdout, bench, 3)
        assert_cell(cells[0], *base)
        assert_cell(cells[1], *fewshot)  # the base fairly prompted: few-shot, no chat template
        assert_cell(cells[2], *em)
        assert float(cells[3]) == pytest.approx(100 * (em[0] / 3 - max(base[0], fewshot[0]) / 3), abs=0.051)
        for tag in ("base", "em"):
            ls = json.loads((tmp_path / f"eval_{tag}" / "results.json").read_text())["metrics"][bench]["logit_stats"]
            assert f"{tag} {bench}: entropy {ls['entropy']:.3f}, skew (vocab) {ls['skew_vocab']:.3f}, skew (pooled " \
                   f"top-k) {ls['skew_topk_pooled']:.3f}" in proc.stdout


def test_em_inf_pipeline_on_tiny_model(parrot_model_dir, parrot_data_dir, tmp_path):
    proc = run_cli("bench/reproduce.py", "em-inf", "--model", parrot_model_dir, "--data-dir", parrot_data_dir,
                   "--benchmarks", "gsm8k,amc23", "--limit", "2", "--max-new-tokens", "32", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # recomputed from the samples: plain and em-inf from the em-inf run (--compare-plain), adaptive-temp from its own
    files = {"plain": "em-inf", "em-inf": "em-inf", "adaptive-temp": "adaptive-temp"}
    res, acc = json.loads((tmp_path / "reproduce.json").read_text()), {m: [] for m in files}
    entropy = json.loads((tmp_path / "em-inf" / "results.json").read_text())["metrics"]["em-inf"]
    for row, bench in zip(res["rows"], ["gsm8k", "amc23"]):
        cells = printed_row(proc.stdout, bench, 2)
        for cell, (mode, run) in zip(cells, files.items()):
            k, n = first_sample_counts(tmp_path / run / "samples.jsonl", bench, mode)
            assert n == 2 and row[mode] == [k, n]
            if mode != "adaptive-temp":  # T = 0.1: the parrot's greedy answer, right on 1 of the first 2 rows
                assert (k, n) == parrot_right(bench, 2)
            assert_cell(cell, k, n)
            acc[mode].append(100 * k / n)
        h = entropy[bench]
        assert cells[3] == f"{h['entropy_t1_before']:.3f} -> {h['entropy_t1_after']:.3f}"
    average = next(x for x in proc.stdout.splitlines() if x.startswith("| average (math) |"))
    assert [float(c) for c in average.strip("|").split("|")[1:4]] == pytest.approx(
        [sum(v) / 2 for v in acc.values()], abs=0.051)


@pytest.fixture
def matplotlib_or_skip():
    """matplotlib is a test-only dependency (.ci/run installs it; reproduce.py draws its figure only when it is
    there): without it the figure test is skipped -- or fails where EM_REQUIRE_MATPLOTLIB=1 (CI must not pass on a
    skip)."""
    if importlib.util.find_spec("matplotlib") is None:
        if os.environ.get("EM_REQUIRE_MATPLOTLIB") == "1":
            pytest.fail("matplotlib is not installed (EM_REQUIRE_MATPLOTLIB=1)", pytrace=False)
        pytest.skip("matplotlib is not installed (a test-only dependency: pip install matplotlib)")


def test_plot_logit_stats_draws_the_histograms(tmp_path, monkeypatch, matplotlib_or_skip):
    """The logit-shift figure: one curve per run, each the share of tokens per skewness bin at the bin centres of
    LogitStats' histogram, labelled with its mean; the x-axis spans the occupied bins (5 bins before, 6 after); a
    PNG written in one piece."""
    import matplotlib.pyplot as plt
    import evaluate as ev
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure open to read back what was drawn
    (lo, hi), bins = ev.LogitStats.HIST[:2], ev.LogitStats.HIST[2]
    w = (hi - lo) / bins
    curves = {"base gsm8k": {90: 3, 100: 5, 110: 2}, "em gsm8k": {130: 4, 150: 4, 260: 1}}
    results = {name: {"logit_stats": {"skew_vocab": 0.25 * i, "skew_vocab_hist": {
        "range": [lo, hi], "counts": [c.get(b, 0) for b in range(bins)]}}} for i, (name, c) in enumerate(curves.items())}
    path = tmp_path / "logit_shift.png"
    assert reproduce.plot_logit_stats(results, str(path)) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["logit_shift.png"]
    (fig,) = figures
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["base gsm8k (mean 0.00)", "em gsm8k (mean 0.25)"]
    for line, c in zip(ax.get_lines(), curves.values()):
        x, y = line.get_data()
        assert list(x) == pytest.approx([lo + (b + 0.5) * w for b in range(bins)])
        assert list(y) == pytest.approx([c.get(b, 0) / sum(c.values()) for b in range(bins)])
    assert ax.get_xlim() == pytest.approx((lo + 90 * w - 5 * w, lo + 260 * w + 6 * w))


def test_failing_step_is_one_line(data_dir, tmp_path):
    proc = run_cli("bench/reproduce.py", "one-shot", "--model", "/nonexistent/model", "--data-dir", data_dir,
                   "--benchmarks", "gsm8k", "--limit", "1", "--out", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "step failed" in proc.stderr and "model path does not exist" in proc.stderr


def test_em_rl_code_pipeline_on_tiny_model(parrot_model_dir, parrot_data_dir, tmp_path):
    """Table 2's code columns: base and EM-RL on LeetCode and LiveCodeBench rows, each printed beside the paper's; the
    parrot's program passes the tests of 1 of the first 2 rows of each (LiveCodeBench at T 0.2: its greedy answer)."""
    proc = run_cli("bench/reproduce.py", "em-rl-code", "--model", parrot_model_dir, "--data-dir", parrot_data_dir,
                   "--limit", "2", "--max-new-tokens", "32", "--train-data",
                   os.path.join(parrot_data_dir, "leetcode.jsonl"),
                   "--train-args=--steps 1 --batch-size 2 --n-rollouts 2 --max-new-tokens 6 --ppo-minibatches 2",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for bench, paper in (("leetcode", "26.1 | 29.5 | 31.1 |"), ("livecodebench", "18.4 | 24.5 | 21.7 |")):
        cells = printed_row(proc.stdout, bench, 2)
        for cell, tag in zip(cells, ("base", "em")):
            counts = first_sample_counts(tmp_path / f"eval_{tag}_{bench}" / "samples.jsonl", bench)
            assert counts == parrot_right(bench, 2)
            assert_cell(cell, *counts)
        assert paper in proc.stdout
    args = json.loads((tmp_path / "train" / "step_1" / "train_args.json").read_text())["args"]
    assert args["template"] == "eurus-code" and args["data"].endswith("leetcode.jsonl")
    lcb = json.loads((tmp_path / "eval_base_livecodebench" / "results.json").read_text())["protocol"]
    assert (lcb["temperature"], lcb["top_p"]) == (0.2, 0.95)  # Table 2's LiveCodeBench sampling

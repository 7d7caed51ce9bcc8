"""The grader on real gold strings of the benchmark files (currency golds, text wrappers, a stray $ in a gold box,
brace-less boxes, the Minerva answer format), every data row checked at load, golds that are missing counted, and
grading bounded off the main thread (math-verify's own time limit is signal.alarm: main thread only). The checks
over every gold of a kind in a file run on the excerpts (tests/data) and again on the whole files."""
import json
import os
import re
import threading
import time

import pyarrow.parquet as pq
import pytest

import evaluate as ev
from conftest import assert_one_line_error, benchmark_row, is_correct, run_cli


def _currency_golds(data_dir):
    """(benchmark, index, gold) for every gold written as currency (\\$36) in MATH500 and the DeepScaleR pool,
    found by reading the raw files (not the loader under test). The excerpts hold all of them."""
    with open(os.path.join(data_dir, "math500.jsonl")) as f:
        math500 = [json.loads(line)["answer"] for line in f]
    dsr = [r["reward_model"]["ground_truth"] for r in pq.read_table(os.path.join(data_dir, "dsr_sub.parquet"))
           .to_pylist()]
    return ([("math500", i, a) for i, a in enumerate(math500) if a.startswith("\\$")] +
            [("dsr", i, a) for i, a in enumerate(dsr) if a.startswith("\\$")])


def test_currency_golds_grade_the_number(each_data_dir):
    data_dir = each_data_dir
    golds = _currency_golds(data_dir)
    assert sum(b == "math500" for b, _, _ in golds) == 3 and sum(b == "dsr" for b, _, _ in golds) >= 4
    loaded = {"math500": ev.load_benchmark("math500", data_dir),
              "dsr": ev.load_benchmark(os.path.join(data_dir, "dsr_sub.parquet"))}
    for bench, i, raw in golds:
        gold = loaded[bench][i]["answer"]
        assert gold == raw  # the loader keeps the gold as written; the grader reads it
        number = re.sub(r"\\\$|\\!|\{,\}|,", "", gold)  # \$32,\!348 -> 32348, \$23{,}000 -> 23000
        value = float(number)
        for pred in (number, f"{value:g}", gold, f"\\${number}"):
            assert is_correct(f"so she pays \\boxed{{{pred}}}.", gold), (bench, i, gold, pred)
        for wrong in (f"{value + 1:g}", f"{value * 10:g}", f"\\${value + 1:g}"):
            assert not is_correct(f"\\boxed{{{wrong}}}", gold), (bench, i, gold, wrong)
    dollars36 = next(i for b, i, g in golds if b == "math500" and g == "\\$36")
    assert is_correct("\\boxed{36}", loaded["math500"][dollars36]["answer"])
    assert not is_correct("\\boxed{37}", loaded["math500"][dollars36]["answer"])


def test_text_wrappers_are_stripped(data_dir):
    math500 = ev.load_benchmark("math500", data_dir)
    evelyn = next(p["answer"] for p in math500 if p["answer"] == "\\text{Evelyn}")
    for wrapped in ("\\textbf{Evelyn}", "\\mathrm{Evelyn}", "\\mathbf{Evelyn}", "\\text{ Evelyn }", "Evelyn"):
        assert ev.normalize_answer(wrapped) == ev.normalize_answer(evelyn)
        assert is_correct(f"\\boxed{{{wrapped}}}", evelyn)
    assert not is_correct("\\boxed{\\textbf{Bob}}", evelyn)
    # nested braces inside a wrapper survive; the wrapper's own brace goes
    assert ev.normalize_answer("\\text{\\frac{1}{2}}") == ev.normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert ev.normalize_answer("\\mathbf{(C)}\\ 12") == "(C)12"
    inches = next(p["answer"] for p in math500 if p["answer"] == "864 \\mbox{ inches}^2")
    assert is_correct("\\boxed{864 \\text{ inches}^2}", inches) and is_correct("\\boxed{864}", inches)
    assert not is_correct("\\boxed{865}", inches)
    # majority vote: \textbf{5} and 5 are one answer
    samples = [{"id": "a", "correct": c, "extracted": e, "length": 1, "truncated": False, "grade_error": False,
                "gold": "5"} for e, c in [("\\textbf{5}", True), ("5", True), ("6", False)]]
    assert ev.compute_metrics(samples, 3)["maj@3"] == 100.0


def test_stray_dollar_inside_a_gold_box(each_data_dir):
    data_dir = each_data_dir
    with open(os.path.join(data_dir, "minerva_math.jsonl")) as f:
        solutions = [json.loads(line)["solution"] for line in f]
    minerva = ev.load_benchmark("minerva", data_dir)
    strays = [i for i, p in enumerate(minerva) if "$" in p["answer"]]
    assert strays and all("\\boxed" in solutions[i] for i in strays)
    gold = minerva[strays[0]]["answer"]
    assert gold == "x_{0} \\cos (\\omega t)+$ $\\dot{x}_{0} \\sin (\\omega t) / \\omega"
    assert ev.grade_answer("x_0 \\cos(\\omega t) + \\frac{\\dot{x}_0}{\\omega} \\sin(\\omega t)", gold) == (True, False)
    # before: the gold parsed as its second half only, so half an answer was graded right
    assert ev.grade_answer("\\dot{x}_{0} \\sin (\\omega t) / \\omega", gold)[0] is False
    assert ev.grade_answer("x_{0} \\cos (\\omega t)", gold)[0] is False
    olymp = ev.load_benchmark("olympiadbench", data_dir)
    union = next(p["answer"] for p in olymp if p["answer"] == "$(-\\infty, 0) \\cup\\{1\\}$.")
    assert is_correct("\\boxed{(-\\infty,0)\\cup\\{1\\}}", union)  # $...$ then a period
    assert not is_correct("\\boxed{(-\\infty,0]\\cup\\{1\\}}", union)
    several = next(p["answer"] for p in olymp if p["answer"] == "$69$,$84$")
    assert is_correct("\\boxed{69, 84}", several) and not is_correct("\\boxed{69, 85}", several)


@pytest.mark.parametrize("response,expected", [
    ("so the total is $\\boxed 5$.", "5"),
    ("\\boxed 12.", "12"),
    ("first \\boxed{3}, then \\boxed 7", "7"),  # the last box, with or without braces
    ("\\boxed 7 and later \\boxed{3}", "3"),
    ("\\boxed\\frac{1}{2}$", "\\frac{1}{2}"),
    ("\\boxed {4}", "4"),
    ("\\[ \\boxed 9 \\]", "9"),
    ("\\( \\boxed x+1 \\) so", "x+1"),
    ("\\boxedanswer 5", None),  # not the \boxed command
    ("\\boxed $", None),  # nothing in it
])
def test_braceless_box(response, expected):
    assert ev.extract_answer(response) == expected


def test_braceless_box_graded(data_dir):
    gold = ev.load_benchmark("gsm8k", data_dir)[0]["answer"]
    assert is_correct("She makes 9 * 2 = $\\boxed 18$ dollars.", gold)
    assert not is_correct("She makes $\\boxed 17$ dollars.", gold)


@pytest.mark.parametrize("response,expected", [
    # the Minerva few-shot format wins over the last number and (as in the Qwen2.5-Math harness) over a box
    ("We get \\boxed{4}.\nFinal Answer: The final answer is $5$. I hope it is correct.", "5"),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct. (checked in 3 steps)", "\\frac{1}{2}"),
    ("The final answer is $\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}$. I hope it is correct.",
     "\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}"),  # across a line break; the old sentence rule fell to "2"
    ("The final answer is $\\$36$. I hope it is correct.", "\\$36"),
    ("The final answer is $\\boxed{7}$. I hope it is correct.", "7"),
    ("so the probability is .5", "0.5"),  # the harness's number pattern: a leading point is a number
    ("costs 1,234.5 in total", "1234.5"),
])
def test_fallback_order(response, expected):
    assert ev.extract_answer(response, fallback=True) == expected


def test_minerva_format_graded(data_dir):
    gold = benchmark_row(data_dir, "math500", "test/prealgebra/1655.json")["answer"]  # row 162: \dfrac{17}{50}
    text = "Final Answer: The final answer is $\\frac{17}{50}$. I hope it is correct.\n\nProblem: 3 more"
    assert is_correct(text, gold, fallback=True) and not is_correct(text, gold)


# ----------------------------------------------------------------------------- data rows
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    return str(path)


GOOD = {"problem": "What is 1+1?", "answer": "2"}


@pytest.mark.parametrize("rows,needle", [
    ([GOOD, GOOD, 5], "row 2 is an int"),
    ([GOOD, ["What is 2+2?", "4"]], "row 1 is a list"),
    ([GOOD, {"problem": ["What is", "2+2?"], "answer": "4"}], "row 1: the problem ('problem') is a list"),
    ([GOOD, {"problem": {"text": "What is 2+2?"}, "answer": "4"}], "row 1: the problem ('problem') is a dict"),
    ([GOOD, {"problem": None, "answer": "4"}], "row 1: the problem ('problem') is null"),
    ([{"problem": None, "answer": "4"}, GOOD], "row 0: the problem ('problem') is null"),
    ([GOOD, {"problem": "  ", "answer": "4"}], "row 1: the problem ('problem') is empty"),
    ([GOOD, {"problem": [{"role": "system", "content": "Be brief."}], "answer": "4"}],
     "row 1: the chat-format problem ('problem') has no user"),
    ([GOOD, {"problem": "2+2?", "answer": {"value": 4}}], "row 1: the answer ('answer') is a dict"),
])
def test_every_row_is_checked(tmp_path, rows, needle):
    path = _write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ev.EvalError) as e:
        ev.load_benchmark(path)
    assert str(e.value).startswith(path) and needle in str(e.value), str(e.value)


def test_file_shapes(tmp_path):
    with pytest.raises(ev.EvalError, match="holds a dict, not a list of rows"):
        ev.load_benchmark(_write(tmp_path / "cols.json", {"data": {"problem": ["1+1?"], "answer": ["2"]}}))
    assert len(ev.load_benchmark(_write(tmp_path / "wrapped.json", {"data": [GOOD, GOOD]}))) == 2
    assert ev.load_benchmark(_write(tmp_path / "one.json", GOOD))[0]["answer"] == "2"  # one object: one row
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n\n" + "{not json\n")
    with pytest.raises(ev.EvalError, match="line 3 is not JSON"):
        ev.load_benchmark(str(tmp_path / "bad.jsonl"))
    # chat prompts: the last user message
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"}, {"role": "user", "content": "Q"}]
    assert ev.load_benchmark(_write(tmp_path / "chat.jsonl", [{"prompt": chat, "answer": 3}]))[0]["problem"] == "Q"


def test_deepscaler_empty_gold_is_none(each_data_dir):
    dsr = ev.load_benchmark(os.path.join(each_data_dir, "dsr_sub.parquet"))
    empty = [i for i, p in enumerate(dsr) if p["answer"] is None]
    raw = pq.read_table(os.path.join(each_data_dir, "dsr_sub.parquet")).to_pylist()
    assert empty == [i for i, r in enumerate(raw) if not r["reward_model"]["ground_truth"].strip()] and empty
    assert [raw[i]["extra_info"]["index"] for i in empty] == [265]  # the one empty gold of the pool


def test_missing_golds_are_counted(tmp_path):
    rows = [GOOD, {"problem": "2+2?", "answer": None}, {"problem": "3+3?", "answer": ""},
            {"problem": "4+4?", "answer": []}, {"problem": "5+5?"}, {"problem": "6+6?", "answer": 12.0}]
    problems = ev.load_benchmark(_write(tmp_path / "holes.jsonl", rows))
    assert [p["answer"] for p in problems] == ["2", None, None, None, None, "12"]
    first_null = ev.load_benchmark(_write(tmp_path / "first.jsonl", [{"problem": "1?", "answer": None}, GOOD]))
    assert [p["answer"] for p in first_null] == [None, "2"]  # the column is found on a later row
    samples = [{"id": p["id"], "sample": j, "correct": ev.grade_answer("2", p["answer"])[0], "extracted": "2",
                "length": 1, "truncated": False, "grade_error": False, "gold": p["answer"]}
               for p in problems for j in range(2)]
    m = ev.compute_metrics(samples, 2)
    assert m["no_gold"] == 4 and m["problems"] == 6 and m["pass@1"] == pytest.approx(100 / 6)
    assert ev.compute_metrics([{**s, "gold": "2"} for s in samples], 2)["no_gold"] == 0
    assert ev.compute_metrics([{k: v for k, v in s.items() if k != "gold"} for s in samples], 2)["no_gold"] == 0


def test_cli_reports_missing_golds_and_bad_rows(tiny_model_dir, tmp_path):
    holes = _write(tmp_path / "holes.jsonl", [GOOD, {"problem": "2+2?", "answer": None}])
    out = tmp_path / "out"
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data", holes, "--max-new-tokens", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "holes: 1 problems have no gold answer and are graded wrong (ids 1)" in proc.stdout
    assert json.loads((out / "results.json").read_text())["metrics"]["holes"]["no_gold"] == 1
    bad = _write(tmp_path / "bad.jsonl", [GOOD, {"problem": {"text": "hi"}, "answer": "1"}])
    assert_one_line_error(run_cli("evaluate.py", "--model", tiny_model_dir, "--data", bad, "--out", str(out)),
                          f"error: {bad}: row 1: the problem ('problem') is a dict")


def test_same_file_stem_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _write(tmp_path / "a" / "test.jsonl", [GOOD]), _write(tmp_path / "b" / "test.jsonl", [GOOD])
    for script, flag in [("evaluate.py", "--data"), ("em_inf.py", "--benchmarks")]:
        proc = run_cli(script, "--model", tiny_model_dir, flag, f"{a},{b}", "--out", str(tmp_path / "out"))
        assert_one_line_error(proc, "two benchmarks are named 'test'", b)


# ----------------------------------------------------------------------------- off the main thread
# The time-out branch, deterministically: math-verify's comparison of sympy expressions (sympy_expr_eq, called inside
# its signal.alarm-guarded section) replaced by one that hangs on a marked answer far past the 1 s limit.
HANG_ANSWER = "987654321"
HANG_SOURCE = """
import time
import math_verify.grader as _grader
_real_eq = _grader.sympy_expr_eq
def sympy_expr_eq(a, b, *args, **kwargs):  # the marked answer hangs (far past the limit), others compare as before
    if "987654321" in str(a) + str(b):
        time.sleep(600)
        return True
    return _real_eq(a, b, *args, **kwargs)
_grader.sympy_expr_eq = sympy_expr_eq
"""


def _in_thread(fn, *args):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(timeout=600)  # the failure detector: before the worker process this ran for more than 15 minutes
    assert not t.is_alive(), "grading in a thread did not finish"
    return out[0]


def _retire_idle_workers():
    with ev._workers_lock:
        workers, ev._idle_workers[:] = list(ev._idle_workers), []
    for w in workers:
        w.kill()
        w.wait()


def test_time_limit_on_the_main_thread(monkeypatch):
    """math-verify's own limit (signal.alarm) ends a comparison that hangs: wrong, and a grading error."""
    import math_verify.grader
    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", math_verify.grader.sympy_expr_eq)  # restored after
    exec(HANG_SOURCE, {})  # the hanging comparison in its place
    assert threading.current_thread() is threading.main_thread()
    assert ev.grade_answer(HANG_ANSWER, "42", 1) == (False, True)  # without the alarm: (True, False) after 600 s
    assert ev.grade_answer("\\frac{1}{2}", "0.5", 1) == (True, False)  # the alarm is cleared: grading goes on


def test_time_limit_off_the_main_thread(tmp_path, monkeypatch):
    """Off the main thread grading runs in a worker process, whose main thread runs math-verify's alarm: the same hang
    (installed in every child through a sitecustomize module) ends in the child's own time limit -- the worker
    answers and is reused, not killed by the parent's backstop -- and a worker that died while idle is replaced."""
    (tmp_path / "sitecustomize.py").write_text(HANG_SOURCE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    _retire_idle_workers()  # workers started from here on have the hang
    try:
        assert _in_thread(ev.grade_answer, "\\frac{1}{2}", "0.5", 1) == (True, False)  # starts a worker
        (worker,) = ev._idle_workers
        assert _in_thread(ev.grade_answer, HANG_ANSWER, "42", 1) == (False, True)  # the child's alarm fired
        assert ev._idle_workers == [worker] and worker.poll() is None  # it answered: the same worker, alive
        assert _in_thread(ev.grade_answer, "\\frac{3}{4}", "0.75", 1) == (True, False)
        worker.kill()  # a worker that died while idle is replaced
        worker.wait()
        assert _in_thread(ev.grade_answer, "\\frac{3}{4}", "0.75") == (True, False)
        assert ev._idle_workers != [worker]
    finally:
        _retire_idle_workers()  # no worker with the hang is left for later tests


def test_worker_past_the_backstop_is_killed_and_replaced(tmp_path, monkeypatch):
    """A hang the child's alarm cannot end (as sympy stuck in C code): the parent kills the worker at its backstop
    (3 time limits + 10 s), the answer counts as a grading error, and the next answer gets a fresh worker."""
    (tmp_path / "sitecustomize.py").write_text(HANG_SOURCE.replace("time.sleep(600)", "import signal\n"
                                               "        signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                                               "        time.sleep(600)"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    _retire_idle_workers()
    try:
        assert _in_thread(ev.grade_answer, "\\frac{1}{2}", "0.5") == (True, False)  # starts a worker
        (worker,) = ev._idle_workers
        t0 = time.time()
        assert _in_thread(ev.grade_answer, HANG_ANSWER, "42", 1) == (False, True)
        assert 13 <= time.time() - t0 < 120 and worker.poll() is not None and ev._idle_workers == []  # killed
        assert _in_thread(ev.grade_answer, "\\frac{3}{4}", "0.75") == (True, False)  # a new worker
        assert ev._idle_workers and ev._idle_workers != [worker]
    finally:
        _retire_idle_workers()


# constructed pairs and their verdicts: (correct, grading error)
THREAD_PAIRS = [(("36", "\\$36"), (True, False)), (("37", "\\$36"), (False, False)),
                (("0.34", "\\dfrac{17}{50}"), (True, False)),
                (("(3,\\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"), (False, False)),
                (("4.5\\times10^{33}", "4.5e33"), (True, False)),
                (("\\frac{1}{2n+2}", "$\\frac{1}{2 n+2}$"), (True, False)),
                (("1+" * 600 + "1", "42"), (False, True)), (("\\text{Evelyn}", "Evelyn"), (True, False))]


def _verdicts_main_and_thread(golds):
    """Each gold graded against itself in braces, then the constructed pairs: the verdicts on the main thread, after
    checking that a thread gives the same."""
    pairs = [(f"{{{g}}}", g) for g in golds] + [pair for pair, _ in THREAD_PAIRS]
    main = [ev.grade_answer(p, g) for p, g in pairs]
    assert _in_thread(lambda: [ev.grade_answer(p, g) for p, g in pairs]) == main
    return main


def test_thread_verdicts_equal_main_thread(data_dir):
    golds = [p["answer"] for p in ev.load_benchmark("math500", data_dir)]
    main = _verdicts_main_and_thread(golds)
    assert main[len(golds):] == [verdict for _, verdict in THREAD_PAIRS]  # both verdicts, and a grading error
    assert any(c for c, _ in main[:len(golds)])  # real golds are graded right, too


def test_thread_verdicts_equal_main_thread_whole_file(full_data_dir):
    main = _verdicts_main_and_thread([p["answer"] for p in ev.load_benchmark("math500", full_data_dir, limit=25)])
    assert sum(c for c, _ in main) >= 20 and not all(c for c, _ in main)  # both verdicts occur

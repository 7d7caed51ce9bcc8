"""Code and logic grading: the released protocols on real rows (HumanEval, MBPP, KK excerpts in tests/data) and on
rows of our own in the LeetCode and LiveCodeBench formats, the extraction rules, and whole-file checks on
$EM_DATA_DIR (every canonical/reference solution passes). The executor itself: test_execution.py."""
import base64
import json
import os
import pickle
import textwrap
import time
import zlib

import pytest

import evaluate as ev
import execution
import training
from conftest import assert_one_line_error, run_cli

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(autouse=True)
def consent(monkeypatch):
    monkeypatch.setenv("EM_ALLOW_CODE_EXECUTION", "1")


def fenced(code, before="Here is my solution.", after="It runs in linear time."):
    return f"{before}\n```python\n{code}\n```\n{after}"


# ----------------------------------------------------------------------------- HumanEval and MBPP (real rows)
@pytest.mark.parametrize("name", ["humaneval", "humaneval-em_pt"])
def test_humaneval_canonical_passes_and_wrong_fails(name):
    rows = {p["id"]: p for p in ev.load_code_benchmark(name, HERE)}
    assert sorted(rows) == ["HumanEval/0", "HumanEval/13", "HumanEval/162", "HumanEval/2", "HumanEval/53"]
    problems, responses, want = [], [], []
    for p in rows.values():  # the canonical solution, written out as a model would: a full function in a block
        problems.append(p)
        responses.append(fenced(p["reference"]))
        want.append(True)
    wrong = {"HumanEval/53": "def add(x: int, y: int):\n    return x + y + 1",  # off by one
             "HumanEval/13": "def greatest_common_divisor(a: int, b: int) -> int:\n"
                             "    while b:\n        a, b = b, a % b\n    return str(a)",  # wrong return type
             "HumanEval/2": "def truncate_number(number: float) -> float:\n    return 0.5"}  # first test only
    for pid, code in wrong.items():
        problems.append(rows[pid])
        responses.append(fenced(code))
        want.append(False)
    got = ev.grade_code_batch(problems, responses)
    assert [c for c, _ in got] == want, got


def test_mbpp_reference_passes_and_wrong_fails():
    rows = {p["id"]: p for p in ev.load_code_benchmark("mbpp", HERE)}
    assert sorted(rows, key=int) == ["2", "3", "17", "82", "83"]
    assert [p["id"] for p in ev.load_code_benchmark("mbpp-378", HERE)] == ["2", "3", "17", "82"]  # 83 was dropped
    assert rows["82"]["test_imports"] == ["import math"] and rows["82"]["entry_point"] == "volume_sphere"
    wrong = {"17": "def square_perimeter(a):\n    return 4 * a + 1",  # off by one
             "3": "def is_not_prime(n):\n    return str(any(n % i == 0 for i in range(2, n)))",  # wrong type
             "2": "def similar_elements(a, b):\n    return (4, 5)"}  # passes the first test only
    problems = list(rows.values()) + [rows[k] for k in wrong]
    responses = [fenced(p["reference"]) for p in rows.values()] + [fenced(c) for c in wrong.values()]
    got = ev.grade_code_batch(problems, responses)
    assert [c for c, _ in got] == [True] * 5 + [False] * 3, got
    # the prompt shows the first test only (OpenCodeEval's MBPP)
    assert ev._code_user_message(rows["2"], "mbpp") == (
        "You are an expert Python programmer, and here is your task:\nWrite a function to find the shared elements "
        "from the given two lists.\nYour code should pass the test:\n" + rows["2"]["tests"][0] + "\n")


# ----------------------------------------------------------------------------- LeetCode (rows of our own, real format)
LEETCODE = {
    "em-own-contest-1-count-vowel-runs": "class Solution:\n    def countVowelRuns(self, s: str) -> int:\n"
                                         "        runs, prev = 0, False\n        for ch in s:\n"
                                         "            v = ch in 'aeiou'\n            runs += v and not prev\n"
                                         "            prev = v\n        return runs",
    "em-own-contest-2-pairs-with-sum-below": "class Solution:\n    def pairsBelow(self, nums: List[int], k: int) -> int:"
                                             "\n        return sum(nums[i] + nums[j] < k for i in range(len(nums)) "
                                             "for j in range(i + 1, len(nums)))",
    "em-own-contest-3-add-next-node-value": "class ListNode:\n    def __init__(self, val=0, next=None):\n"
                                            "        self.val = val\n        self.next = next\n\nclass Solution:\n"
                                            "    def addNext(self, head):\n        node = head\n        while node:\n"
                                            "            if node.next:\n                node.val += node.next.val\n"
                                            "            node = node.next\n        return head",
    "em-own-contest-4-smallest-digit-product": "class Solution:\n    def smallestDigitProduct(self, n: int) -> int:\n"
                                               "        if n == 1:\n            return 1\n        digits = []\n"
                                               "        for d in range(9, 1, -1):\n            while n % d == 0:\n"
                                               "                digits.append(d)\n                n //= d\n"
                                               "        return int(''.join(map(str, sorted(digits)))) if n == 1 "
                                               "else -1",
}


def test_leetcode_rows_of_our_own():
    rows = {p["id"]: p for p in ev.load_code_benchmark("leetcode", HERE)}
    assert sorted(rows) == sorted(LEETCODE) and all(p["tests"].count("assert ") >= 20 for p in rows.values())
    vowel, pairs, linked = (rows[k] for k in list(LEETCODE)[:3])
    cases = [(rows[k], fenced(code, before="Let me think.\n```python\nprint('a draft')\n```"), True)
             for k, code in LEETCODE.items()]
    cases += [
        # no `class Solution:`: the method is indented under one (EM_PT), and passes
        (vowel, fenced(textwrap.dedent(LEETCODE[vowel["id"]].split("\n", 1)[1])), True),
        (pairs, fenced(LEETCODE[pairs["id"]].replace("< k", "<= k")), False),  # off by one
        (vowel, fenced(LEETCODE[vowel["id"]].replace("return runs", "return str(runs)")), False),  # wrong type
        (vowel, fenced("class Solution:\n    def countVowelRuns(self, s):\n        return 3"), False),  # 1st only
        # a free function (no self) is wrapped into the class and then fails: quirk of the released wrapping
        (vowel, fenced("def countVowelRuns(s):\n    return sum(1 for i, c in enumerate(s) if c in 'aeiou' and "
                       "(i == 0 or s[i - 1] not in 'aeiou'))"), False),
        # ListNode is not provided by the harness: a solution that leaves it out fails (as released)
        (linked, fenced(LEETCODE[linked["id"]].split("\n\n", 1)[1]), False),
    ]
    got = ev.grade_code_batch([c[0] for c in cases], [c[1] for c in cases])
    assert [c for c, _ in got] == [c[2] for c in cases], got
    job, limit, code = ev.code_job(vowel, fenced("x = 1"))
    assert limit == 10.0 and code == "class Solution:\n    \n    \n    x = 1\n    \n    "  # as EM_PT wraps it
    assert job["code"].startswith("import math\nimport re\n") and "from functools import *" in job["code"]


# ----------------------------------------------------------------------------- LiveCodeBench (rows of our own)
SUM_SQUARES = "n = int(input())\nprint(sum(int(x) ** 2 for x in input().split()))"


def test_livecodebench_rows_of_our_own():
    rows = {p["id"]: p for p in ev.load_code_benchmark("livecodebench", HERE)}
    squares, mean, gap, rotate = rows["emx001_a"], rows["emx001_b"], rows["9001"], rows["9002"]
    assert gap["fn_name"] == "maxGap" and squares["fn_name"] is None
    assert isinstance(squares["private_tests"], str) and len(ev._lcb_private(squares["private_tests"])) == 4
    cases = [
        (squares, SUM_SQUARES, True),
        (squares, "import sys\ndata = sys.stdin.read().split()\nprint(sum(int(x) ** 2 for x in data[1:]))", True),
        (squares, "import sys\ninput = sys.stdin.readline\ndef main():\n    n = int(input())\n"
                  "    print(sum(int(x) ** 2 for x in input().split()))\n\nif __name__ == '__main__':\n    main()", True),
        (squares, "n = int(input())\nprint(sum(int(x) ** 2 for x in input().split()) + 1)", False),  # off by one
        (squares, "n = int(input())\nprint({'3': 14, '1': 16}.get(input().strip()[:1], 14))", False),  # public only
        # `global` inside the released code() wrapper names a module global that the wrapper made local: fails
        (squares, "total = 0\ndef add(x):\n    global total\n    total += x * x\nn = int(input())\n"
                  "for x in input().split():\n    add(int(x))\nprint(total)", False),
        (mean, "n = int(input())\na = list(map(int, input().split()))\nprint(sum(a) / n)", True),  # 2.5 vs 2.5000000000
        (mean, "n = int(input())\na = list(map(int, input().split()))\nprint(round(sum(a) / n, 1))", False),
        (gap, "class Solution:\n    def maxGap(self, nums):\n        s = sorted(nums)\n"
              "        return max((b - a for a, b in zip(s, s[1:])), default=0)", True),
        (gap, "class Solution:\n    def maxGap(self, nums):\n        return max(nums) - min(nums)", False),
        (rotate, "class Solution:\n    def rotateRight(self, nums, k):\n        k %= len(nums)\n"
                 "        return tuple(nums[-k:] + nums[:-k]) if k else tuple(nums)", True),  # tuples read as lists
        (rotate, "class Solution:\n    def rotateRight(self, nums, k):\n        return nums", False),
    ]
    got = ev.grade_code_batch([c[0] for c in cases], [fenced(c[1]) for c in cases])
    assert [c for c, _ in got] == [c[2] for c in cases], got
    # the response is cut at "###", where the released runner stopped generating (--stop "###")
    assert not ev.grade_code_batch([squares], ["### Plan\nNo code yet.\n" + fenced(SUM_SQUARES)])[0][0]
    assert ev.grade_code_batch([squares], [fenced(SUM_SQUARES) + "\n### Next action: [OUTPUT]"])[0][0]


def test_lcb_private_tests_never_unpickle_objects():
    tests = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    assert ev._lcb_private(packed) == tests
    assert ev._lcb_private(json.dumps(tests)) == tests
    evil = base64.b64encode(zlib.compress(pickle.dumps(os.system))).decode()  # names posix.system
    with pytest.raises(ev.EvalError, match="may not name"):
        ev._lcb_private(evil)


@pytest.mark.parametrize("out,expected,ok", [
    ("3\n", "3\n", True), ("3", "3\n", True), ("  3  \n", "3", True), ("1 2\n3\n\n", "1 2\n3", True),
    ("1 2 \n3 \n", "1 2\n3\n", True), ("1\n\n2\n", "1\n2\n", True), ("2.5\n", "2.5000000000\n", True),
    ("2.5001\n", "2.5\n", False), ("2.500001\n", "2.5\n", True), ("-1.0\n", "-1\n", True), ("12\n", "012\n", False),
    ("1 2\n", "1  2\n", False), ("Yes\n", "yes\n", False), ("", "\n", True), ("3\n4\n", "3\n", False),
])
def test_lcb_stdout_comparison(out, expected, ok):
    assert execution._lcb_stdout_ok(out, expected) is ok


# ----------------------------------------------------------------------------- Knights and Knaves (real rows)
def kk_answer(p, roles=None, think="Let me check each statement.", tail=""):
    lines = p["answer"].split("\n") if roles is None else roles
    return f"{think}</think><answer> {chr(10).join(lines)} </answer>{tail}"


def test_kk_grader_on_real_rows():
    rows = {p["id"]: p for p in ev.load_code_benchmark("kk", HERE)}
    assert sorted(rows) == ["2ppl-0", "2ppl-1", "3ppl-7", "5ppl-50", "8ppl-99"]
    with open(os.path.join(HERE, "kk.jsonl")) as f:
        raw = {r["id"]: r for r in map(json.loads, f)}
    for p in rows.values():  # the gold the grader reads is the row's own solution
        roles = [f"{n} is a {'knight' if s else 'knave'}" for n, s in zip(raw[p["id"]]["names"], raw[p["id"]]["solution"])]
        assert ev.grade_kk(kk_answer(p, roles), p) == (True, "passed")
        assert ev.grade_kk(kk_answer(p), p) == (True, "passed")
    p = rows["2ppl-0"]  # (1) Zoey is a knave (2) Oliver is a knight
    assert ev.grade_kk(kk_answer(p, ["(1) Zoey is a knight", "(2) Oliver is a knight"]), p)[0] is False
    assert ev.grade_kk(kk_answer(p, ["Oliver is a knight, Zoey is a knave"]), p)[0] is True  # order free
    # Logic-RL's known quirks, kept: "not a knight" reads knight; a name with another's role on its line
    assert ev.grade_kk(kk_answer(p, ["(1) Zoey is not a knight", "(2) Oliver is a knight"]), p)[0] is False
    assert ev.grade_kk(kk_answer(p, ["(1) Zoey is not a knave, she is a knave", "(2) Oliver is a knight"]), p)[0]
    assert ev.grade_kk(kk_answer(p, ["(1) Zoey, unlike Oliver who is a knight, is a knave",
                                     "(2) Oliver is a knight"]), p)[0] is False
    # format (released: exactly one </think>, <answer>, </answer>, in order): a right last answer fails too
    two = kk_answer(p, ["Zoey is a knight"]) + "<answer> Zoey is a knave, Oliver is a knight </answer>"
    assert ev.grade_kk(two, p) == (False, "failed: format")
    assert ev.grade_kk("no tags: Zoey is a knave, Oliver is a knight", p)[0] is False
    assert ev.grade_kk(kk_answer(p, ["Zoey is a knave"]), p) == (False, "failed: no role for Oliver")


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("response,expected", [
    ("a\n```python\ndef f():\n    return 1\n```\nthen\n```python\nprint(f())\n```", "\ndef f():\n    return 1\n"),
    ("```python\nx = 1\n```\n```python\ny = 2\n```", "\ny = 2\n"),  # no def: the last block
    ("```\ndef g(): pass\n```\n```\nz = 3\n```", "\ndef g(): pass\n"),  # plain fences, same rule
    ("no fences at all\ndef h(): pass", "no fences at all\ndef h(): pass"),  # the whole text
    ("before\n```python\nunclosed", "before\n"),  # text before the first fence
    ("```Python\ndef k(): pass\n```", "Python\ndef k(): pass\n"),  # quirk: ```Python is a plain block
])
def test_extract_code_em_pt(response, expected):
    assert ev.extract_code(response) == expected


def test_extract_code_sanitize_and_protocol_quirks():
    response = ("I'll write it.\n```python\nimport math\n\ndef area(r):\n    return helper(r) * math.pi\n\n"
                "def helper(r):\n    return r * r\n\ndef unused():\n    return 0\n\nprint(area(2))\n"
                "assert area(1) == math.pi\n```\nThat's it.")
    assert ev.extract_code(response, "sanitize", entry_point="area") == (
        "import math\ndef area(r):\n    return helper(r) * math.pi\ndef helper(r):\n    return r * r")
    # past its budget the search gives up and all ```python blocks are joined (the released 3 s fallback)
    assert ev.extract_code(response, "sanitize", entry_point="area", budget=1).startswith("import math\n\ndef area")
    # the \n</think> quirk of One-shot EM's HumanEval: the text between the first and the second </think>
    p = ev.load_code_benchmark("humaneval", HERE)[3]
    assert p["id"] == "HumanEval/53"
    good = fenced("def add(x: int, y: int):\n    return x + y")
    _, _, code = ev.code_job(p, "draft</think>" + good + "</think>" + fenced("def add(x, y):\n    return 0"))
    assert "x + y" in code
    # generation stopped at "\nprint(" (OpenCodeEval's stop strings): what follows is never graded
    _, _, code = ev.code_job(p, good.replace("```\nIt", "\nprint(add(1, 2))\ndef add(x, y):\n    return 0\n```\nIt"))
    assert "x + y" in code and "return 0" not in code


def test_sanitize_search_picks_what_the_released_search_picks():
    """The pruned search for the longest parsable run of lines gives the released O(n^2) search's run (same AST) on
    random mixes of prose, code, blocks, indentation and unfinished lines."""
    import ast
    import random

    def released(lines):  # OpenCodeEval eval/sanitize.py extract_longest_valid_code, restated
        best, snippet = 0, ""
        for i in range(len(lines)):
            for j in range(i, len(lines)):
                try:
                    ast.parse("\n".join(lines[i:j + 1]))
                except SyntaxError:
                    continue
                if sum(1 for line in lines[i:j + 1] if line.strip()) > best:
                    best, snippet = sum(1 for line in lines[i:j + 1] if line.strip()), "\n".join(lines[i:j + 1])
        return snippet
    pool = ["Let's do it.", "Here is the code:", "def f(x):", "    return x + 1", "", "   ", "x = 1", "if x:",
            "else:", "    pass", "```python", "```", "print(f(2))", "# note", "return 5", '"""', "doc line",
            "class A:", "    def g(self):", "        return 1", "(1,", "2)", "x = 1 + \\", "3", "@dec", "  bad"]
    rng = random.Random(0)
    for _ in range(300):
        lines = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        want, got = released(lines), ev._longest_parsable(lines, None)
        assert (ast.dump(ast.parse(want)) if want else "") == (ast.dump(ast.parse(got)) if got else ""), lines


# ----------------------------------------------------------------------------- prompts, loading, dispatch
def test_sanitizer_is_bounded_and_off_the_main_thread(monkeypatch):
    """Finding 9: the sanitizer's search was capped in parses, not time: a 12,000-character response held the
    evaluator's main thread for 28-92 s before any program ran. It stops at 3 s of its thread's CPU time (the
    released limit) and falls back to the fenced blocks, and grading extracts in worker threads."""
    import threading
    mbpp = ev.load_code_benchmark("mbpp", HERE)[0]
    response = "```python\n" + "x = [1,\n" * 1500 + "```"
    t0 = time.thread_time()
    code = ev.graded_code(mbpp, response)
    assert time.thread_time() - t0 < 5 and code == ev._fenced_blocks(ev._refine(response))
    threads, real = [], ev.graded_code
    monkeypatch.setattr(ev, "graded_code", lambda *a: threads.append(threading.current_thread()) or real(*a))
    assert ev.grade_code_batch([mbpp] * 2, [fenced(mbpp["reference"])] * 2) == [(True, "passed")] * 2 or \
        execution.containment()["level"] != "bubblewrap"
    assert len(threads) == 2 and threading.main_thread() not in threads


def test_code_prompts(tiny):
    _, tok = tiny
    lc = ev.load_code_benchmark("leetcode", HERE)[0]
    text = ev.build_code_prompt(tok, lc)
    assert "[ASSESS]\n\n[ADVANCE]" in text and text.count(ev.CODE_SUFFIX) == 1
    lcb = ev.load_code_benchmark("livecodebench", HERE)
    text = ev.build_code_prompt(tok, lcb[0])  # LiveCodeBench's Eurus prompt: literal backslash-n (as released)
    assert "\\n\\n[ASSESS]\\n\\n" in text and "### Format: Read the inputs from stdin" in text
    assert "```python\nclass Solution:\n    def maxGap" in ev.build_code_prompt(tok, lcb[2])
    kk = ev.load_code_benchmark("kk", HERE)[0]
    released = ev.build_code_prompt(tok, kk)
    assert released.startswith("<|im_start|>system\nYou are a helpful assistant.") and released.endswith(
        f"<|im_start|>user\n{kk['problem']}\n<|im_end|>\n<|im_start|>assistant\n<think>")
    he = ev.load_code_benchmark("humaneval", HERE)[0]
    assert "Please provide a self-contained Python script" in ev.build_code_prompt(tok, he)


def test_loader_bad_inputs(tmp_path):
    with pytest.raises(ev.EvalError, match="unknown benchmark 'apps'"):
        ev.load_benchmark("apps", HERE)
    with pytest.raises(ev.EvalError, match="no humaneval.jsonl in"):
        ev.load_code_benchmark("humaneval", str(tmp_path))
    (tmp_path / "humaneval.jsonl").write_text(json.dumps({"task_id": "X/0", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ev.EvalError, match=r"row 0 has no test, entry_point"):
        ev.load_code_benchmark("humaneval", str(tmp_path))
    (tmp_path / "livecodebench.jsonl").write_text(json.dumps(
        {"question_id": "q", "question_content": "c", "public_test_cases": "not json", "private_test_cases": "[]"}))
    with pytest.raises(ev.EvalError, match="row 0: public_test_cases/metadata are not JSON"):
        ev.load_code_benchmark("livecodebench", str(tmp_path))


def test_grade_batch_mixes_math_code_and_logic():
    math = {"id": "m", "problem": "1+1?", "answer": "2"}
    code = ev.load_code_benchmark("mbpp", HERE)[2]
    kk = ev.load_code_benchmark("kk", HERE)[0]
    got = ev.grade_batch([math, code, kk, math, code], ["\\boxed{2}", fenced(code["reference"]), kk_answer(kk),
                                                        "\\boxed{3}", "no code"])
    assert [c for c, _ in got] == [True, True, True, False, False] and got[3] == (False, "failed")


# ----------------------------------------------------------------------------- whole files ($EM_DATA_DIR)
def test_full_humaneval_canonical_solutions_pass(full_data_dir):
    for name in ("humaneval", "humaneval-em_pt"):
        rows = ev.load_code_benchmark(name, full_data_dir)
        assert len(rows) == 164
        got = ev.grade_code_batch(rows, [fenced(p["reference"]) for p in rows])
        failed = [(p["id"], s) for p, (c, s) in zip(rows, got) if not c]
        assert not failed, (name, failed)


def test_full_mbpp_reference_solutions_pass(full_data_dir):
    rows = ev.load_code_benchmark("mbpp", full_data_dir)
    assert len(rows) == 399 and len(ev.load_code_benchmark("mbpp-378", full_data_dir)) == 378
    # a longer limit than the released 3 s: task 123's reference alone needs ~6 s on a slow CPU
    got = ev.grade_code_batch(rows, [fenced(p["reference"]) for p in rows], timeout=60)
    failed = [(p["id"], s) for p, (c, s) in zip(rows, got) if not c]
    assert not failed, failed


def test_full_leetcode_and_kk_files(full_data_dir):
    lc = ev.load_code_benchmark("leetcode", full_data_dir)
    assert len(lc) == 180 and all(p["tests"].count("\nassert ") == 100 for p in lc)
    assert sorted(p["difficulty"] for p in lc).count("Medium") == 91
    kk = ev.load_code_benchmark("kk", full_data_dir)
    assert len(kk) == 700 and len({p["id"] for p in kk}) == 700
    with open(os.path.join(full_data_dir, "kk.jsonl")) as f:
        raw = [json.loads(line) for line in f]
    for p, r in zip(kk, raw):  # the gold the grader reads agrees with the generator's solution
        assert ev.grade_kk(kk_answer(p), p) == (True, "passed"), p["id"]
        flipped = [f"{n} is a {'knave' if s else 'knight'}" for n, s in zip(r["names"], r["solution"])]
        assert ev.grade_kk(kk_answer(p, flipped), p)[0] is False, p["id"]


# ----------------------------------------------------------------------------- evaluate.py on code and logic
def test_cli_evaluates_every_code_benchmark_and_needs_consent(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """The four offline code/logic benchmarks (and LiveCodeBench rows) end to end on the tiny model: their released
    prompts, graded, the protocol in results.json; without consent, one line naming the flag, before the model
    loads."""
    monkeypatch.delenv("EM_ALLOW_CODE_EXECUTION")
    args = ["evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks",
            "humaneval,mbpp,leetcode,livecodebench,kk,gsm8k", "--limit", "2", "--max-new-tokens", "6"]
    proc = run_cli(*args, "--out", str(tmp_path / "no"))
    assert_one_line_error(proc, "--allow-code-execution", "EM_ALLOW_CODE_EXECUTION")
    assert "Loading weights" not in proc.stderr
    proc = run_cli(*args, "--out", str(tmp_path / "yes"), "--allow-code-execution")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "yes" / "results.json").read_text())
    assert set(res["protocol"]["code"]) == {"humaneval", "mbpp", "leetcode", "livecodebench", "kk"}
    assert res["protocol"]["code"]["leetcode"]["timeout"] == 10.0 and res["protocol"]["code"]["kk"]["kind"] == "logic"
    samples = [json.loads(line) for line in (tmp_path / "yes" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {s["kind"] for s in samples} == {"code", "logic", "math"}
    for s in samples:  # the prompts are the protocols' own, and the gibberish fails with a status saying why
        assert s["correct"] is False and s["status"] != "passed"
        problem = next(p for p in ev.load_benchmark(s["benchmark"], data_dir) if p["id"] == s["id"])
        assert problem["problem"].strip()[:30] in s["prompt"]
        assert s["prompt"].endswith("<think>") == (s["kind"] == "logic")  # KK's pre-filled assistant turn
    assert res["metrics"]["average"]["pass@1"] == 0.0


def test_grade_file_grades_saved_responses(data_dir, tmp_path):
    """--grade FILE: responses made elsewhere, graded into results.json/samples.jsonl like a generation run: the
    canonical HumanEval solution passes and a wrong one fails, a right KK answer passes, math golds grade."""
    he, kk = ev.load_benchmark("humaneval", data_dir), ev.load_benchmark("kk", data_dir)
    gsm = ev.load_benchmark("gsm8k", data_dir)
    rows = [("humaneval", he[0]["id"], fenced(he[0]["reference"]), True),
            ("humaneval", he[1]["id"], fenced("def truncate_number(number):\n    return 0.0"), False),
            ("kk", kk[0]["id"], f"<think> so </think><answer>{kk[0]['answer']}</answer>", True),
            ("kk", kk[1]["id"], "<think> so </think><answer>(1) nobody</answer>", False),
            ("gsm8k", gsm[0]["id"], f"so \\boxed{{{gsm[0]['answer']}}}", True),
            ("gsm8k", gsm[1]["id"], "so \\boxed{-1}", False)]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"benchmark": b, "id": i, "response": r}) + "\n" for b, i, r, _ in rows))
    proc = run_cli("evaluate.py", "--grade", str(path), "--data-dir", data_dir, "--out", str(tmp_path / "out"),
                   "--allow-code-execution")
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(s["benchmark"], s["id"], s["correct"]) for s in samples] == [(b, i, ok) for b, i, _, ok in rows]
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]
    assert {k: m["pass@1"] for k, m in metrics.items()} == {"humaneval": 50.0, "kk": 50.0, "gsm8k": 50.0,
                                                            "average": 50.0}  # as a generation run's
    path.write_text(json.dumps({"benchmark": "kk", "id": "no-such-id", "response": "x"}) + "\n")
    assert_one_line_error(run_cli("evaluate.py", "--grade", str(path), "--data-dir", data_dir, "--out",
                                  str(tmp_path / "bad")), "no problem with id 'no-such-id'")


def test_every_script_takes_code_and_logic_prompts(tiny_model_dir, tiny, data_dir, tmp_path):
    """em_ft trains on KK prompts, em_inf runs LeetCode and KK, select_prompt ranks HumanEval and KK pools (by name,
    from --data-dir): each builds the protocol's own prompt and grades the kind's way."""
    tok = tiny[1]
    kk, lc = ev.load_benchmark("kk", data_dir, limit=2), ev.load_benchmark("leetcode", data_dir, limit=2)
    proc = run_cli("em_ft.py", "--model", tiny_model_dir, "--data", "kk", "--data-dir", data_dir, "--max-steps", "1",
                   "--batch-size", "2", "--max-new-tokens", "6", "--log-rollouts", "--out", str(tmp_path / "ft"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rollouts = [json.loads(line) for line in (tmp_path / "ft" / "rollouts.jsonl").read_text().splitlines()]
    kk_prompts = {ev.build_prompt(tok, p) for p in ev.load_benchmark("kk", data_dir)}  # Logic-RL's
    assert len(rollouts) == 2 and all(r["prompt"] in kk_prompts and r["prompt"].endswith("<think>") for r in rollouts)
    proc = run_cli("em_inf.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "leetcode,kk",
                   "--limit", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "inf"), "--allow-code-execution")
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = [json.loads(line) for line in (tmp_path / "inf" / "samples.jsonl").read_text().splitlines()]
    problems = {(b, p["id"]): p for b, ps in (("leetcode", lc), ("kk", kk)) for p in ps}
    assert sorted((s["benchmark"], s["id"]) for s in samples) == sorted(problems)
    for s in samples:
        p = problems[s["benchmark"], s["id"]]
        assert s["kind"] == p["kind"] and s["prompt"] == ev.build_prompt(tok, p)
        assert s["correct"] == ev.grade_batch([p], [s["response"]])[0][0]
    assert set(json.loads((tmp_path / "inf" / "results.json").read_text())["protocol"]["code"]) == {"leetcode", "kk"}
    for name, score in (("humaneval", "variance"), ("kk", "disagreement")):
        out = tmp_path / f"{name}.jsonl"
        proc = run_cli("select_prompt.py", "--model", tiny_model_dir, "--data", name, "--data-dir", data_dir,
                       "--limit", "2", "--k", "2", "--keep-samples", "2", "--max-new-tokens", "6", "--score", score,
                       "--out", str(out), "--allow-code-execution")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ranked = [json.loads(line) for line in (tmp_path / f"{name}.ranked.jsonl").read_text().splitlines()]
        pool = {p["id"]: p for p in ev.load_benchmark(name, data_dir, limit=2)}
        assert sorted(r["id"] for r in ranked) == sorted(pool)
        for r in ranked:  # its counts, recomputed from the samples it kept
            if score == "variance":
                assert r["n_correct"] == sum(ok for ok, _ in ev.grade_batch([pool[r["id"]]] * 2, r["samples"]))
            else:
                answers = [ev.final_answer(pool[r["id"]], x) for x in r["samples"]]
                assert r["score"] == 1 - max(map(answers.count, answers)) / 2
        assert "final answers in" in proc.stdout and "--template qwen-math" not in proc.stdout
        # the pick is a whole problem: em_ft.py --data reads it back with its protocol's prompt and tests
        picked = ev.load_benchmark(str(out), require_answer=False)
        assert len(picked) == 1 and {k: v for k, v in picked[0].items() if k in pool[picked[0]["id"]]} == \
            pool[picked[0]["id"]]
        assert ev.build_prompt(tok, picked[0], "chat") == ev.build_prompt(tok, pool[picked[0]["id"]])
        said = picked[0]["samples"][:1]
        assert ev.grade_batch(picked, said) == ev.grade_batch([pool[picked[0]["id"]]], said)
    broken = tmp_path / "broken.jsonl"  # a KK problem without its gold: one line naming the row, not a KeyError
    broken.write_text(json.dumps({k: v for k, v in picked[0].items() if k != "answer"}) + "\n")
    with pytest.raises(ev.EvalError, match="broken.jsonl: row 0 has no answer"):
        ev.load_benchmark(str(broken))
    for bad, why in (({"answer": 7}, "row 0: answer is an int, not what kk reads"),
                     ({"problem": " "}, "row 0: problem is empty, not what kk reads")):
        broken.write_text(json.dumps({**picked[0], **bad}) + "\n")
        with pytest.raises(ev.EvalError, match=f"broken.jsonl: {why}"):
            ev.load_benchmark(str(broken))
    broken.write_text(json.dumps(picked[0]) + "\n" + json.dumps(picked[0]) + "\n")
    with pytest.raises(ev.EvalError, match="broken.jsonl: the id .* appears twice"):
        ev.load_benchmark(str(broken))


def test_code_benchmark_generation_stops_at_the_protocol_string(tiny, data_dir, monkeypatch):
    """evaluate_model stops a code response where the released generation stopped (the protocol's stop strings), so
    its length and truncation are those of the text that is graded."""
    model, tok = tiny
    problem = ev.load_benchmark("humaneval", data_dir, limit=1)
    run = dict(max_new_tokens=24, temperature=1.0, batch_size=1, progress=False)  # sampled: the same seed per batch
    free = ev.evaluate_model(model, tok, problem, **run)[1][0]
    assert free["truncated"] and free["length"] == 24
    ids = tok(free["response"], add_special_tokens=False).input_ids
    stop = tok.decode(ids[8:10])  # a string the response reaches near its 10th token, as the protocol's stop
    assert 0 < free["response"].find(stop)
    monkeypatch.setitem(ev.CODE_PROTOCOLS["humaneval"], "stop", (stop,))
    cut = ev.evaluate_model(model, tok, problem, **run)[1][0]
    assert not cut["truncated"] and cut["length"] < 24 and cut["response"].endswith(stop)
    assert free["response"].startswith(cut["response"]) and cut["correct"] == free["correct"] is False


def test_every_code_and_logic_problem_reads_back_whole(data_dir, tmp_path):
    """A file of problems as load_benchmark returns them (select_prompt's pick) loads back unchanged, for every
    code and logic benchmark: PROBLEM_FIELDS names what each protocol's loader gives."""
    for name in ev.CODE_BENCHMARKS:
        problems = ev.load_benchmark(name, data_dir)
        path = tmp_path / f"{name}.jsonl"
        ev.write_json_atomic(str(path), problems, lines=True)
        assert ev.load_benchmark(str(path)) == problems, name
        assert ev.load_benchmark(str(path), limit=1) == problems[:1], name


def test_hub_loaded_rows_are_json(monkeypatch, tmp_path):
    """Through datasets (the Hub path; here its json loader on our excerpt) LiveCodeBench's contest_date is a datetime:
    the problems must still be JSON (select_prompt writes its pick whole)."""
    protocol, fname, _ = ev.CODE_BENCHMARKS["livecodebench"]
    monkeypatch.setitem(ev.CODE_BENCHMARKS, "livecodebench", (protocol, fname, {
        "path": "json", "split": "train", "data_files": os.path.join(HERE, fname), "cache_dir": str(tmp_path)}))
    hub, local = ev.load_benchmark("livecodebench"), ev.load_benchmark("livecodebench", HERE)
    assert [p["id"] for p in hub] == [p["id"] for p in local] and json.loads(json.dumps(hub))
    assert all(isinstance(p["contest_date"], str) for p in hub)


def test_write_json_atomic_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    ev.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        ev.write_json_atomic(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_training_eval_runs_programs_with_the_scripts_workers(tiny, data_dir, monkeypatch):
    """--code-workers reaches the --eval-* grading of em_ft and em_rl (evaluate_on_ranks)."""
    import argparse
    seen, real = [], execution.run_programs
    monkeypatch.setattr(execution, "run_programs", lambda *a, **kw: seen.append(
        a[3] if len(a) > 3 else kw.get("workers")) or real(*a, **kw))
    args = argparse.Namespace(eval_max_new_tokens=4, rollout_batch_size=2, seed=0, eval_benchmark="humaneval",
                              engine="static", code_workers=3, eval_template="chat", rollout_engine="static")
    problems = ev.load_benchmark("humaneval", data_dir, limit=2)
    m = training.evaluate_on_ranks(tiny[0], tiny[1], problems, args, 0, 1)
    args.code_workers = None
    training.evaluate_on_ranks(tiny[0], tiny[1], problems, args, 0, 1)
    assert seen == [3, None] and m["eval_humaneval"] == 0.0 and m["eval_problems"] == 2

"""evaluate.py: loaders on the real benchmark files (excerpts in tests/data; row counts on the whole files), grading
on real answer strings, metrics against brute force, batched generation against one-by-one generation, resume
equivalence, and the bad-input paths of the CLI."""
import itertools
import json
import math
import os

import pytest
import torch

import evaluate as ev
from conftest import assert_one_line_error, benchmark_row, is_correct, record_generate, run_cli, source_position


# ----------------------------------------------------------------------------- loaders
def _check_counts_and_fields(folder, name, count):
    rows = ev.load_benchmark(name, folder)
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count  # ids are unique (resume keys on them)
    assert all(r["problem"].strip() and r["answer"] for r in rows)


@pytest.mark.parametrize("name", list(ev.BENCHMARKS))
def test_loader_counts_and_fields(data_dir, name):
    with open(os.path.join(data_dir, ev.BENCHMARKS[name][0])) as f:
        lines = [line for line in f if line.strip()]
    _check_counts_and_fields(data_dir, name, len(lines))  # one problem per line of the excerpt


@pytest.mark.parametrize("name,count", [("math500", 500), ("amc23", 40), ("aime24", 30), ("aime25", 30),
                                        ("minerva", 272), ("olympiadbench", 675), ("gsm8k", 1319),
                                        ("aimo-amc", 83), ("aimo-aime", 90)])
def test_loader_counts_and_fields_whole_files(full_data_dir, name, count):
    _check_counts_and_fields(full_data_dir, name, count)


def test_loader_gold_conventions(each_data_dir):
    folder = each_data_dir
    assert ev.load_benchmark("amc23", folder)[0]["answer"] == "27"  # 27.0 float -> "27"
    assert ev.load_benchmark("gsm8k", folder)[0]["answer"] == "18"  # after "####"
    olymp = ev.load_benchmark("olympiadbench", folder)
    with open(os.path.join(folder, "olympiadbench.jsonl")) as f:
        raw = [json.loads(line) for line in f]
    assert [r["answer"] for r in olymp] == [r["final_answer"][0] for r in raw]  # first of the list
    minerva = ev.load_benchmark("minerva", folder)
    with open(os.path.join(folder, "minerva_math.jsonl")) as f:
        first = json.loads(f.readline())
    assert "answer" not in first and minerva[0]["answer"] == "1.6"  # last \boxed{} of the solution
    assert first["solution"].rstrip().endswith("\\boxed{1.6}$.") or "\\boxed{1.6}" in first["solution"]
    math500 = ev.load_benchmark("math500", folder, limit=3)
    assert len(math500) == 3 and math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_loader_local_file_and_nested_columns(data_dir, tmp_path):
    path = os.path.join(data_dir, "dsr_sub.parquet")
    pi1 = ev.load_benchmark(path)[source_position(path, 124)]  # extra_info.index 124
    assert pi1["answer"] == "12.8" and "wind on a sail" in pi1["problem"]  # chat list -> user text
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"q": "What is 1+1?", "gold": 2.0}, {"q": "2+2?", "gold": 4}]))
    rows = ev.load_benchmark(str(path), problem_key="q", answer_key="gold")
    assert rows == [{"id": "0", "problem": "What is 1+1?", "answer": "2"}, {"id": "1", "problem": "2+2?",
                                                                             "answer": "4"}]
    unlabeled = ev.load_benchmark(str(path), problem_key="q", answer_key="nope", require_answer=False)
    assert [r["answer"] for r in unlabeled] == [None, None]


def test_deepscaler_pool_whole_file(full_data_dir):
    dsr = ev.load_benchmark(os.path.join(full_data_dir, "dsr_sub.parquet"))
    assert len(dsr) == 1209
    assert dsr[124]["answer"] == "12.8" and "wind on a sail" in dsr[124]["problem"]  # pi1 is row 124


def test_loader_bad_inputs(tmp_path):
    with pytest.raises(ev.EvalError, match="unknown benchmark"):
        ev.load_benchmark("math5000")
    with pytest.raises(ev.EvalError, match="no such file"):
        ev.load_benchmark(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ev.EvalError, match="empty"):
        ev.load_benchmark(str(tmp_path / "empty.jsonl"))
    (tmp_path / "cols.jsonl").write_text(json.dumps({"text": "hi", "answer": "1"}) + "\n")
    with pytest.raises(ev.EvalError, match="no problem column"):
        ev.load_benchmark(str(tmp_path / "cols.jsonl"))
    (tmp_path / "noans.jsonl").write_text(json.dumps({"problem": "hi"}) + "\n")
    with pytest.raises(ev.EvalError, match="no answer column"):
        ev.load_benchmark(str(tmp_path / "noans.jsonl"))
    (tmp_path / "list.jsonl").write_text("[1]\n")
    with pytest.raises(ev.EvalError, match="list.jsonl: row 0 is a list, not an object"):
        ev.load_benchmark(str(tmp_path / "list.jsonl"))


def test_benchmark_not_on_disk_and_hub_unreachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("EM_DATA_DIR", raising=False)  # (run_cli runs offline: HF_HUB_OFFLINE=1)
    for name, hint in (("amc23", "pass a local file or --data-dir"), ("kk", "pass --data-dir with kk.jsonl")):
        assert_one_line_error(run_cli("evaluate.py", "--model", "unused", "--benchmarks", name, "--out",
                                      str(tmp_path)), f"cannot load {name} (", "from the Hugging Face Hub", hint)


# ----------------------------------------------------------------------------- extraction and grading
@pytest.mark.parametrize("response,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{41}, on reflection \\boxed{42}", "42"),  # several boxes: the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces inside the box
    ("\\boxed{\\boxed{7}}", "7"),  # nested boxes: the last box to open (as Qwen-Math's extractor)
    ("\\fbox{3}", "3"),
    ("The answer is 42.", None),  # no box
    ("\\boxed{42", None),  # unbalanced: never closes
    ("", None),
])
def test_extract_answer(response, expected):
    assert ev.extract_answer(response) == expected


@pytest.mark.parametrize("response,expected", [
    ("Janet makes 9 * 2 = 18 dollars.\n\nThe answer is 18.", "18"),  # a real SmolLM2-style ending
    ("The answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is 8.\nThen 9 more.", "8"),  # "the answer is" beats the last number
    ("so x = 3 and she pays $1,234", "1234"),  # else the last number, thousands separators dropped
    ("\\boxed{7}. The answer is 8.", "7"),  # a box always wins
    ("no numbers here", None),
])
def test_extract_answer_fallbacks(response, expected):
    assert ev.extract_answer(response, fallback=True) == expected
    assert ev.extract_answer(response) == (expected if "boxed" in response else None)  # strict by default


# Whole-file row number -> the row's own id where the two differ (AMC's id, Minerva's and GSM8K's idx are the row
# number): rows are looked up by id, which the excerpts keep.
ROW_IDS = {"math500": {0: "test/precalculus/807.json", 4: "test/algebra/1349.json", 31: "test/prealgebra/1302.json",
                       44: "test/prealgebra/1558.json", 78: "test/intermediate_algebra/47.json",
                       162: "test/prealgebra/1655.json", 307: "test/precalculus/695.json"},
           "olympiadbench": {1: 1610}}


def _gold(data_dir, bench, index):
    return benchmark_row(data_dir, bench, ROW_IDS.get(bench, {}).get(index, index))["answer"]


@pytest.mark.parametrize("response,bench,index,expected", [
    ("Thus $(r,\\theta)$ is \\boxed{(3, \\frac{\\pi}{2})}", "math500", 0, True),  # \left( 3, \frac{\pi}{2} \right)
    ("\\boxed{(3, \\pi)}", "math500", 0, False),
    ("\\boxed{\\frac{17}{50}}", "math500", 162, True),  # gold \dfrac{17}{50}
    ("\\boxed{0.34}", "math500", 162, True),  # decimal vs fraction
    ("\\boxed{\\frac54}", "math500", 44, True),  # gold 1.25
    ("\\boxed{Evelyn}", "math500", 4, True),  # gold \text{Evelyn}
    ("\\boxed{\\text{Bob}}", "math500", 4, False),
    ("\\boxed{(-2,1)}", "math500", 78, True),  # tuple
    ("\\boxed{(1,-2)}", "math500", 78, False),  # order matters in a tuple
    ("\\boxed{(-\\infty, 0]}", "math500", 307, True),  # interval
    ("\\boxed{(-\\infty, 0)}", "math500", 307, False),  # open vs closed end
    ("\\boxed{11\\sqrt{2}}", "math500", 31, True),  # gold 11\sqrt2
    ("\\boxed{27}", "amc23", 0, True),  # gold 27.0 in the file
    ("\\boxed{27.0}", "amc23", 0, True),
    ("\\boxed{28}", "amc23", 0, False),
    ("\\boxed{\\frac{1}{2n+2}}", "olympiadbench", 1, True),  # gold $\frac{1}{2 n+2}$
    ("\\boxed{4.5 \\times 10^{33}}", "minerva", 1, True),  # gold 4.5e33
    ("\\boxed{18}", "gsm8k", 0, True),
    ("the answer is 18", "gsm8k", 0, False),  # no box -> wrong
    ("\\boxed{18} no wait \\boxed{17}", "gsm8k", 0, False),  # last box counts
])
def test_is_correct_on_real_answers(data_dir, response, bench, index, expected):
    assert is_correct(response, _gold(data_dir, bench, index)) is expected


def test_grader_survives_hostile_answers():
    for hostile in ["\\boxed{" + "1+" * 25000 + "1}",  # 50k characters
                    "\\boxed{\\boxed{\\boxed{}}",  # unbalanced and nested
                    "\\boxed{10^{10^{10}}}",  # sympy would evaluate forever: math-verify's time limit
                    "\\boxed{" + "\\frac{" * 300 + "1" + "}" * 300 + "}"]:
        assert is_correct(hostile, "42") is False
    correct, error = ev.grade_answer("1+" * 25000 + "1", "42")
    assert (correct, error) == (False, True)  # counted wrong, and counted as a grading error


# ----------------------------------------------------------------------------- metrics
def test_pass_at_k_matches_brute_force():
    for n, c in [(5, 0), (5, 2), (8, 3), (8, 8), (6, 1)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def _sample(pid, correct, extracted, length=10, truncated=False):
    return {"id": pid, "correct": correct, "extracted": extracted, "length": length, "truncated": truncated,
            "grade_error": False}


def test_metrics_by_hand():
    samples = [_sample("a", True, "2"), _sample("a", False, "3"), _sample("a", True, "2"), _sample("a", False, None),
               _sample("b", False, "5", 30, True), _sample("b", False, "5"), _sample("b", True, "6"),
               _sample("b", False, None, 50, True)]
    m = ev.compute_metrics(samples, n=4)
    assert m["pass@1"] == pytest.approx(100 * 3 / 8)
    assert m["maj@4"] == pytest.approx(50.0)  # a: "2" wins and is right; b: "5" wins and is wrong
    assert m["pass@2"] == pytest.approx(100 * (ev.pass_at_k(4, 2, 2) + ev.pass_at_k(4, 1, 2)) / 2)
    assert m["pass@4"] == pytest.approx(100.0)
    assert m["format_rate"] == pytest.approx(100 * 6 / 8)
    assert m["truncated_rate"] == pytest.approx(25.0)
    assert m["mean_length"] == pytest.approx((10 * 6 + 30 + 50) / 8)


# ----------------------------------------------------------------------------- prompts and generation
def test_build_prompt_templates(tiny):
    _, tok = tiny
    p = ev.build_prompt(tok, "What is $x$ in {a}?")
    assert p == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                 "<|im_end|>\n<|im_start|>user\nWhat is $x$ in {a}?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful assistant." in ev.build_prompt(tok, "q", "chat")  # model's default system prompt
    assert ev.build_prompt(tok, "q", "plain").startswith("Question: q\n")
    with pytest.raises(ev.EvalError, match="unknown template"):
        ev.build_prompt(tok, "q", "nope")


def test_batched_greedy_equals_one_by_one(tiny, data_dir):
    model, tok = tiny
    problems = ev.load_benchmark("math500", data_dir, limit=5)
    prompts = [ev.build_prompt(tok, p["problem"]) for p in problems]
    assert len({len(tok(p).input_ids) for p in prompts}) > 1  # really different lengths -> real left padding
    batched = ev.generate_batch(model, tok, prompts, max_new_tokens=24)
    for prompt, got in zip(prompts, batched):
        alone = ev.generate_batch(model, tok, [prompt], max_new_tokens=24)[0]
        assert got["ids"] == alone["ids"]
        # and against a hand-written greedy loop without cache: the KV cache and padding change nothing
        ids = tok(prompt, return_tensors="pt").input_ids
        for _ in range(len(alone["ids"])):
            with torch.no_grad():
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert ids[0, -len(alone["ids"]):].tolist() == alone["ids"]


def test_generate_stops_at_eos_and_marks_truncation(tiny):
    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # Force eos after 3 tokens with a logits processor: the completion keeps eos and is not truncated.
    from transformers import LogitsProcessor

    class ForceEos(LogitsProcessor):
        def __init__(self, at):
            self.at, self.start = at, None

        def __call__(self, input_ids, scores):
            self.start = self.start or input_ids.shape[1]
            if input_ids.shape[1] - self.start == self.at:
                scores[:] = -float("inf")
                scores[:, eos] = 0
            return scores

    out = ev.generate_batch(model, tok, ["hello", "a longer prompt here"], 10, logits_processor=[ForceEos(3)])
    assert all(len(o["ids"]) == 4 and o["ids"][-1] == eos and not o["truncated"] for o in out)
    out = ev.generate_batch(model, tok, ["hello"], 5)
    assert out[0]["truncated"] == (eos not in out[0]["ids"]) and len(out[0]["ids"]) <= 5


def test_generate_stops_at_endoftext(tiny):
    """<|endoftext|> (Qwen base models' eos; the tiny tokenizer's pad) ends a response as <|im_end|> does, in a batch
    whose other rows go on: the row keeps it as its last token and is not truncated. A tokenizer whose eos is
    <|endoftext|> still stops at <|im_end|> (a base model prompted with the chat template)."""
    import copy
    model, tok = tiny
    eot, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == eos != eot

    class ForceRow0:  # row 0 may only emit <|endoftext|> as its 3rd new token
        calls = 0

        def __call__(self, input_ids, scores):
            ForceRow0.calls += 1
            if ForceRow0.calls == 3:
                scores[0] = -float("inf")
                scores[0, eot] = 0
            return scores

    out = ev.generate_batch(model, tok, ["hello", "a longer prompt here"], 10, logits_processor=[ForceRow0()])
    assert out[0]["ids"][-1] == eot and len(out[0]["ids"]) == 3 and not out[0]["truncated"]
    assert len(out[1]["ids"]) == 10 and eot not in out[1]["ids"]  # the other row ran on (it never stops)
    assert out[0]["text"] == tok.decode(out[0]["ids"][:2])  # the stop token is not in the text
    base = copy.deepcopy(tok)
    base.eos_token = "<|endoftext|>"
    assert {eot, eos} <= set(ev.stop_token_ids(base, model)) and {eot, eos} <= set(ev.stop_token_ids(tok, model))


def test_cli_metrics_and_average_recomputed_from_samples(tiny_model_dir, data_dir, tmp_path):
    """evaluate.py --n 4 on two files: every metric of results.json, and its average row, recomputed from
    samples.jsonl: pass@k by brute force over all k-subsets of each problem's samples, maj@4 by counting the
    normalized answers (the first of equals wins), averages over the benchmarks. The golds are chosen from what the
    tiny model says (T=3, --answer-fallback: the last number), so that some samples are right and some majorities
    wrong: a first run with placeholder golds shows the answers, the second (same seeds: same samples) grades them."""
    from collections import Counter
    rows = ev.load_benchmark("gsm8k", data_dir, limit=6)
    args = ["--model", tiny_model_dir, "--template", "plain", "--temperature", "3", "--n", "4", "--max-new-tokens",
            "12", "--answer-fallback", "--batch-size", "6"]

    def run(golds, out):
        (out / "data").mkdir(parents=True)
        for name, part in (("a", rows[:3]), ("b", rows[3:])):
            (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(
                {"id": r["id"], "problem": r["problem"], "answer": golds.get(r["id"], "none")}) + "\n" for r in part))
        ev.main(args + ["--data", f"{out}/data/a.jsonl,{out}/data/b.jsonl", "--out", str(out)])
        with open(out / "samples.jsonl") as f:
            return [json.loads(line) for line in f], json.loads((out / "results.json").read_text())["metrics"]

    first, _ = run({}, tmp_path / "first")
    golds = {}
    for j, r in enumerate(rows):  # alternately the most and the least common answer of the problem
        said = Counter(ev.normalize_answer(s["extracted"]) for s in first if s["id"] == r["id"] and s["extracted"])
        if said:
            golds[r["id"]] = said.most_common()[0 if j % 2 == 0 else -1][0]
    samples, metrics = run(golds, tmp_path / "second")
    assert [s["response"] for s in samples] == [s["response"] for s in first]  # the same samples, regraded
    assert set(metrics) == {"a", "b", "average"}
    keys = ["pass@1", "pass@2", "pass@4", "maj@4", "format_rate", "mean_length"]
    for name in ("a", "b"):
        mine = [s for s in samples if s["benchmark"] == name]
        by_id = {}
        for s in mine:
            by_id.setdefault(s["id"], []).append(s)
        assert len(by_id) == 3 and all(len(g) == 4 for g in by_id.values())
        want = {"pass@1": 100 * sum(s["correct"] for s in mine) / 12}
        for k in (2, 4):  # the share of k-subsets with a right sample, per problem, averaged
            want[f"pass@{k}"] = 100 * sum(
                sum(any(s["correct"] for s in sub) for sub in itertools.combinations(g, k)) / math.comb(4, k)
                for g in by_id.values()) / 3
        maj = 0
        for g in by_id.values():
            said = [ev.normalize_answer(s["extracted"]) for s in g if s["extracted"] is not None]
            if said:
                top = max(said, key=lambda a: (said.count(a), -said.index(a)))
                maj += next(s["correct"] for s in g if s["extracted"] and ev.normalize_answer(s["extracted"]) == top)
        want["maj@4"] = 100 * maj / 3
        want["format_rate"] = 100 * sum("\\boxed" in s["response"] for s in mine) / 12
        want["mean_length"] = sum(s["length"] for s in mine) / 12
        assert {k: metrics[name][k] for k in keys} == pytest.approx(want), name
        assert metrics[name]["samples"] == 12 and metrics[name]["problems"] == 3
    assert {k: metrics["average"][k] for k in keys} == pytest.approx(
        {k: (metrics["a"][k] + metrics["b"][k]) / 2 for k in keys})
    assert 0 < sum(s["correct"] for s in samples) < len(samples)  # the checks above are not all zeros
    assert any(metrics[x]["maj@4"] < metrics[x]["pass@4"] for x in "ab")  # some majority is wrong, a sample right


def test_evaluate_model_in_memory(parrot_model_dir, parrot_data_dir):
    """evaluate_model on a loaded model: n samples per problem in order, each graded, and every metric's value
    recomputed from them. The parrot's samples at T 0.7 mix a right boxed 7, a wrong boxed "eight" and no answer
    (seed 2: two problems whose samples tie, 7 first in one and eight first in the other), so the counts, the
    majority vote (ties: the answer seen first) and pass@2 are neither all 0 nor all 100, and differ."""
    model, tok = ev.load_model(parrot_model_dir)
    problems = ev.load_benchmark("gsm8k", parrot_data_dir, limit=4)  # golds 7, 8, 7, 9
    metrics, samples = ev.evaluate_model(model, tok, problems, max_new_tokens=8, temperature=0.7, top_p=0.9, n=2,
                                         batch_size=4, seed=2, progress=False)
    assert [(s["id"], s["sample"]) for s in samples] == [(p["id"], j) for p in problems for j in range(2)]
    golds = {p["id"]: p["answer"] for p in problems}
    for s in samples:  # each graded: its last boxed answer against the gold
        assert s["extracted"] == ev.extract_answer(s["response"]) and s["gold"] == golds[s["id"]]
        assert s["correct"] == (s["extracted"] is not None and is_correct(s["response"], s["gold"]))
    assert len({s["extracted"] for s in samples}) == 3 and 0 < sum(s["correct"] for s in samples) < 8
    assert all(s["truncated"] == (s["length"] == 8) for s in samples)  # the 7's response runs past 8 tokens
    pairs = [samples[i:i + 2] for i in range(0, 8, 2)]
    maj = 0
    for pair in pairs:  # the most common answer, the first seen among equals; no answer never votes
        said = [s["extracted"] for s in pair if s["extracted"] is not None]
        if said:
            top = max(said, key=lambda a: (said.count(a), -said.index(a)))
            maj += next(s["correct"] for s in pair if s["extracted"] == top)
    want = {"samples": 8, "problems": 4, "pass@1": 100 * sum(s["correct"] for s in samples) / 8,
            "pass@2": 100 * sum(any(s["correct"] for s in pair) for pair in pairs) / 4, "maj@2": 100 * maj / 4,
            "format_rate": 100 * sum(s["extracted"] is not None for s in samples) / 8,
            "truncated_rate": 100 * sum(s["truncated"] for s in samples) / 8,
            "mean_length": sum(s["length"] for s in samples) / 8}
    assert {k: metrics[k] for k in want} == pytest.approx(want)
    assert 0 < metrics["maj@2"] < metrics["pass@2"] < 100 and 0 < metrics["pass@1"] and model.training is False


def test_resume_gives_identical_results(tiny_model_dir, data_dir, tmp_path):
    args = ["evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "gsm8k,amc23",
            "--limit", "3", "--max-new-tokens", "12", "--temperature", "0.8", "--n", "2", "--batch-size", "2"]
    full = run_cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    # An "interrupted" run: keep the first batch of gsm8k only, and a half-written line as a crash leaves it.
    lines = (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    first_batch = [line for line in lines if json.loads(line)["benchmark"] == "gsm8k"][:2]
    (cut / "samples.jsonl").write_text("\n".join(first_batch) + "\n" + lines[3][:20])
    resumed = run_cli(*args, "--out", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 2 finished samples" in resumed.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())["metrics"]
    b = json.loads((cut / "results.json").read_text())["metrics"]
    for m in (a, b):
        for bench in m.values():
            bench.pop("gen_tokens_per_s", None)
    assert a == b
    assert sorted((tmp_path / "full" / "samples.jsonl").read_text().splitlines()) == sorted(
        (cut / "samples.jsonl").read_text().splitlines())  # same samples, none twice
    changed = run_cli(*args[:-1], "3", "--out", str(cut))  # another batch size: refuse to mix runs
    assert_one_line_error(changed, "different run")


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_results_and_samples(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data", os.path.join(data_dir, "math500.jsonl"),
                   "--limit", "4", "--max-new-tokens", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| math500 |" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["template"] == "qwen-math" and res["protocol"]["temperature"] == 0.0
    assert res["protocol"]["max_new_tokens"] == 8 and res["protocol"]["seed"] == 0
    assert set(res["versions"]) == {"torch", "transformers", "datasets", "math-verify", "tqdm"}
    assert res["metrics"]["math500"]["problems"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    assert set(samples[0]) >= {"id", "prompt", "response", "extracted", "gold", "correct"}
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    assert os.environ["EM_DTYPE"] == "float32"  # conftest pins it: no outcome depends on the CPU running the tests
    assert ev.resolve_dtype(None)[0] == torch.float32 and ev.resolve_dtype("bfloat16")[0] == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: native)
        assert ev.resolve_dtype("auto")[0] == want
    with pytest.raises(ev.EvalError):
        ev.resolve_dtype("float16")


def test_cli_dtype_auto_says_what_it_chose(tiny_model_dir, data_dir, tmp_path):
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--limit", "1",
                   "--max-new-tokens", "2", "--dtype", "auto", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    # the expected choice from this CPU's flags as the kernel lists them (not from resolve_dtype, under test here):
    # native bf16 = avx512_bf16 or AMX's bf16 tiles; without /proc/cpuinfo (not Linux), torch's own CPU probes
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), ":").split(":", 1)[1].split())
        native = bool({"avx512_bf16", "amx_bf16"} & flags)
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert f"--dtype auto: {'bf16' if native else 'fp32'}, this CPU has " in proc.stdout, proc.stdout
    protocol = json.loads((tmp_path / "o" / "results.json").read_text())["protocol"]
    assert protocol["dtype"] == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("extra,needle", [
    (["--benchmarks", "math5000"], "unknown benchmark"),
    (["--data", "/nonexistent/file.jsonl"], "no such file"),
    (["--model", "/nonexistent/model"], "model path does not exist"),
    (["--n", "4"], "needs --temperature"),
    (["--limit", "0"], "argument --limit: must be an integer >= 1"),
])
def test_cli_bad_inputs(tiny_model_dir, data_dir, tmp_path, extra, needle):
    args = ["--model", tiny_model_dir, "--data-dir", data_dir, "--limit", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "o")]
    proc = run_cli("evaluate.py", *args, *extra)
    assert_one_line_error(proc, needle)


def test_folder_that_is_not_a_model(tiny_model_dir, data_dir, tmp_path):
    import shutil
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "step_2")  # --model run instead of run/step_2
    proc = run_cli("evaluate.py", "--model", str(tmp_path / "run"), "--data-dir", data_dir, "--limit", "1",
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "not a model", "step_2")


def test_rewritten_checkpoint_is_not_resumed(tiny_model_dir, data_dir, tmp_path):
    import shutil
    ckpt = tmp_path / "step_2"
    shutil.copytree(tiny_model_dir, ckpt)
    args = ["evaluate.py", "--model", str(ckpt), "--data-dir", data_dir, "--benchmarks", "gsm8k", "--limit", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path / "o")]
    assert run_cli(*args).returncode == 0
    os.utime(ckpt / "model.safetensors", (1, 1))  # the same path, other weights (as a new training run leaves)
    assert_one_line_error(run_cli(*args), "different run", "model_files")


def test_cli_file_without_columns_and_empty(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "1"}) + "\n")
    out = ("--out", str(tmp_path / "out"))
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data", str(bad), *out)
    assert_one_line_error(proc, "no problem column")
    empty = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    assert_one_line_error(run_cli("evaluate.py", "--model", tiny_model_dir, "--data", str(empty), *out), "empty")


def test_prompt_longer_than_context(tiny, tmp_path):
    model, tok = tiny
    problems = [{"id": "0", "problem": "word " * (model.config.max_position_embeddings + 10), "answer": "1"}]
    with pytest.raises(ev.EvalError, match="does not fit"):
        ev.evaluate_model(model, tok, problems, max_new_tokens=4, progress=False)


# ----------------------------------------------------------------------------- logit-shift analysis
def _skew(x):  # biased Fisher-Pearson skewness, written out
    x = x.double()
    m = x.mean()
    return (((x - m) ** 3).mean() / ((x - m) ** 2).mean() ** 1.5).item()


def test_logit_stats_against_direct_formulas():
    torch.manual_seed(0)
    stop = 7
    stats = ev.LogitStats([stop], temperature=0.6, top_k=5)
    steps = [torch.randn(3, 40) * torch.tensor([[1.0], [3.0], [0.5]]) for _ in range(4)]
    # row 2 samples the stop token at step 1 (it is the last input id at step 2): from step 2 on it is padding
    last_tokens = [[1, 1, 1], [2, 2, 2], [3, 3, stop], [4, 4, 0]]
    live_rows = [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1]]
    for t, (scores, last) in enumerate(zip(steps, last_tokens)):
        ids = torch.tensor([[5] * (t + 1) + [x] for x in last])
        stats(ids, scores.clone())
    live = torch.cat([s[r] for s, r in zip(steps, live_rows)])
    res = stats.result()
    assert res["tokens"] == len(live) == 10
    logp = live.log_softmax(-1)
    assert res["entropy"] == pytest.approx(-(logp.exp() * logp).sum(-1).mean().item(), rel=1e-5)
    assert res["skew_vocab"] == pytest.approx(sum(_skew(row) for row in live) / len(live), rel=1e-5)
    pooled = (live / 0.6).topk(5, dim=-1).values.flatten()
    assert res["skew_topk_pooled"] == pytest.approx(_skew(pooled), rel=1e-5)
    # the figure's histogram: bin i holds skew in (lo + i*w, lo + (i+1)*w], live tokens only
    (lo, hi), counts = res["skew_vocab_hist"]["range"], res["skew_vocab_hist"]["counts"]
    w, want = (hi - lo) / len(counts), [0] * len(counts)
    for row in live:
        want[min(max(math.ceil((_skew(row) - lo) / w) - 1, 0), len(counts) - 1)] += 1
    assert counts == want and sum(counts) == 10 and len([c for c in counts if c]) > 1


def test_logit_stats_histogram_end_bins_take_outliers():
    torch.manual_seed(2)
    scores = torch.randn(3, 400) * 0.01
    scores[0, 0], scores[1, 0] = 50.0, -50.0  # one spike: skewness about +-sqrt(399) ~ +-20, outside [-5, 15]
    stats = ev.LogitStats([9999])
    stats(torch.tensor([[1], [2], [3]]), scores)
    counts = stats.result()["skew_vocab_hist"]["counts"]
    assert counts[-1] == 1 and counts[0] == 1 and sum(counts) == 3


def test_logit_stats_leave_masked_logits_out():
    torch.manual_seed(1)
    scores = torch.randn(2, 30)
    masked = scores.clone()
    masked[:, 20:] = -float("inf")  # e.g. a vocabulary mask applied by another processor
    stats = ev.LogitStats([99], temperature=1.0, top_k=25)  # k > the 20 finite logits: the -inf ones must drop
    stats(torch.tensor([[1], [2]]), masked)
    res = stats.result()
    assert res["skew_vocab"] == pytest.approx((_skew(scores[0, :20]) + _skew(scores[1, :20])) / 2, rel=1e-5)
    assert res["skew_topk_pooled"] == pytest.approx(_skew(scores[:, :20].flatten()), rel=1e-5)
    logp = scores[:, :20].log_softmax(-1)
    assert res["entropy"] == pytest.approx(-(logp.exp() * logp).sum(-1).mean().item(), rel=1e-5)


def test_logit_stats_in_generation_count_generated_tokens(tiny, data_dir, monkeypatch):
    """In generation the statistics see the raw logits of every generated token once (two batches): the entropy and
    the mean skewness recomputed from the generated tokens (recorded around the real generate_batch) with an
    unpadded forward of prompt + the tokens before each."""
    model, tok = tiny
    problems = ev.load_benchmark("gsm8k", data_dir, limit=3)
    made = record_generate(monkeypatch)
    metrics, samples = ev.evaluate_model(model, tok, problems, max_new_tokens=6, temperature=0.6, top_k=50,
                                         batch_size=2, progress=False, logit_stats=True)
    assert metrics["logit_stats"]["tokens"] == sum(s["length"] for s in samples) == sum(len(o["ids"]) for _, o in made)
    logits = []
    for prompt, o in made:
        ids = tok(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits.append(model(torch.tensor([ids + o["ids"]])).logits[0, len(ids) - 1:-1])
    z = torch.cat(logits).double()
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert metrics["logit_stats"]["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-4)
    assert metrics["logit_stats"]["skew_vocab"] == pytest.approx(sum(_skew(row) for row in z) / len(z), rel=1e-4)


def test_cli_logit_stats_histogram(tiny_model_dir, data_dir, tmp_path):
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--benchmarks", "gsm8k", "--data-dir", data_dir,
                   "--limit", "2", "--max-new-tokens", "5", "--logit-stats", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    ls = json.loads((tmp_path / "results.json").read_text())["metrics"]["gsm8k"]["logit_stats"]
    lengths = [json.loads(line)["length"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sum(ls["skew_vocab_hist"]["counts"]) == ls["tokens"] == sum(lengths) and len(lengths) == 2


def test_sampling_ignores_model_generation_config_defaults(tiny):
    """A model's generation_config (Qwen instruct ships top_k=20, repetition_penalty=1.05) must not leak into the
    protocol: with its top_k set to 1, sampling at top_k=0 must still sample, not decode greedily."""
    model, tok = tiny
    old = model.generation_config.top_k, model.generation_config.repetition_penalty
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 5.0
    try:
        prompts = ["hello there"] * 8
        greedy = ev.generate_batch(model, tok, prompts, 12)
        sampled = ev.generate_batch(model, tok, prompts, 12, temperature=1.5, seed=0)
        assert len({tuple(o["ids"]) for o in sampled}) > 1  # top_k=1 would make all 8 identical
        ids = tok(prompts[0], return_tensors="pt").input_ids  # plain argmax: the config's penalty 5.0 is unused
        for _ in range(len(greedy[0]["ids"])):
            with torch.no_grad():
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert ids[0, -len(greedy[0]["ids"]):].tolist() == greedy[0]["ids"]
    finally:
        model.generation_config.top_k, model.generation_config.repetition_penalty = old

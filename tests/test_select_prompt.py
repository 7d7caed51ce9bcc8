"""select_prompt.py: scores vs hand-computed values, ranking and ties, entropy vs a direct forward, output that
em_ft.py's loader reads, resume without resampling, torchrun sharding, and one-line errors on bad input."""
import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_one_line_error, record_generate, run_cli, run_torchrun, source_position
import select_prompt as sp
import evaluate as ev
from evaluate import load_benchmark

PI1 = ("The pressure \\( P \\) exerted by wind on a sail varies jointly as the area \\( A \\) of the sail and the cube "
       "of the wind's velocity \\( V \\). When the velocity is \\( 8 \\) miles per hour, the pressure on a sail of "
       "\\( 2 \\) square feet is \\( 4 \\) pounds. Find the wind velocity when the pressure on \\( 4 \\) square feet "
       "of sail is \\( 32 \\) pounds.")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def pool(data_dir, tmp_path_factory):
    """Six real DeepScaleR rows (pi1 = row 124 and pi2 = row 267 among them) in the parquet's own nested schema.
    Rows by extra_info.index, their row number in the whole file."""
    parquet = os.path.join(data_dir, "dsr_sub.parquet")
    rows = pq.read_table(parquet).to_pylist()
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with open(path, "w") as f:
        for i in (0, 124, 1, 267, 2, 3):
            f.write(json.dumps({"id": str(i), **rows[source_position(parquet, i)]}) + "\n")
    return str(path)


def main_error(*argv):
    """In-process main(): the one-line message of a bad-input exit (argparse's or ours)."""
    with pytest.raises(SystemExit) as e:
        sp.main(list(argv))
    return str(e.value.code)


# ----------------------------------------------------------------------------- the scores, by hand
def test_variance_by_hand():
    assert [sp.variance_score(c, 4) for c in range(5)] == [0, 3 / 16, 1 / 4, 3 / 16, 0]
    assert sp.variance_score(3, 10) == sp.variance_score(7, 10) == 0.21  # exact tie, unlike 0.3*(1-0.3) in floats
    assert sp.variance_score(8, 16) == 0.25


def test_disagreement_constructed_answers():
    assert sp.disagreement_score(["12.8"] * 16) == 0  # all equal
    assert sp.disagreement_score([str(i) for i in range(16)]) == 1 - 1 / 16  # all different: maximal
    boxed = [ev.final_answer({}, f"\\boxed{{{a}}}") for a in ["\\frac{1}{2}", "\\dfrac{1}{2}", "\\frac{1}{2}.", "0.5"]]
    assert sp.disagreement_score(boxed) == 0.25  # as final_answer normalizes them
    assert sp.disagreement_score([None, None, "1", "2"]) == 0.5  # "no answer" is one bucket
    assert sp.disagreement_score([None] * 4) == 0


def test_entropy_score_is_token_mean():
    # pooled over all tokens (10/16), not the mean of per-sample means ((1+0+0+0)/4)
    assert sp.entropy_score([10.0, 0, 0, 0], [10, 2, 2, 2]) == 10 / 16


def test_rank_key_ties():
    rows = [{"score": sp.variance_score(c, 4), "p": c / 4, "index": i} for i, c in enumerate([1, 3, 2, 0, 2])]
    assert [r["index"] for r in sorted(rows, key=sp.rank_key)] == [2, 4, 0, 1, 3]  # equal variance -> pool order
    rows = [{"score": 0.5, "p": p, "index": i} for i, p in enumerate([None, 0.25, 0.5, 0.5, 0.75])]
    assert [r["index"] for r in sorted(rows, key=sp.rank_key)] == [2, 3, 1, 4, 0]  # p nearest 1/2, None last
    assert sp.tie_at_top(sorted(rows, key=sp.rank_key)) == 2  # 2 and 3: same score and p, pool order decides
    assert sp.tie_at_top([{"score": 0.0, "p": 0.0}] * 5) == 5 and sp.tie_at_top([]) == 0


def test_strip_suffix_row_124(data_dir):
    parquet = os.path.join(data_dir, "dsr_sub.parquet")
    row = load_benchmark(parquet)[source_position(parquet, 124)]
    assert row["problem"].endswith("within \\boxed{}.") and sp.strip_suffix(row["problem"]) == PI1
    assert sp.strip_suffix(PI1) == PI1
    assert sp.strip_suffix("x? Let us think step by step and output the final answer within \\boxed{}") == "x?"


# ----------------------------------------------------------------------------- entropy vs a direct forward
def test_token_entropy_matches_direct_forward(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 11, 2)]
    responses = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (7, 1, 12)]
    for temp in (1.0, 0.5):
        got = sp.token_entropy(model, prompts, responses, temp, chunk=4)  # chunks cut across rows
        for p, r, h in zip(prompts, responses, got):
            with torch.no_grad():
                logits = model(torch.tensor([p + r])).logits[0].float() / temp
            want = 0.0
            for t in range(len(p) - 1, len(p) + len(r) - 1):  # the positions that produced response tokens
                prob = torch.softmax(logits[t], -1)
                want -= (prob * prob.log()).sum().item()
            assert h == pytest.approx(want, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def sampled(tiny_model_dir, pool, tmp_path_factory):
    """One real run: 6 candidates x k=2, batches of 3 (a candidate's samples straddle batches), T=3 for variety."""
    out = str(tmp_path_factory.mktemp("sel") / "prompt.jsonl")
    args = ["select_prompt.py", "--model", tiny_model_dir, "--data", pool, "--k", "2", "--batch-size", "3",
            "--max-new-tokens", "12", "--temperature", "3", "--top", "2", "--keep-samples", "2", "--out", out]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return args, out


def test_outputs_round_trip_into_em_ft_loader(sampled, pool, tmp_path):
    """The ranking of a real run's records, with correct counts that differ (the tiny model's own samples are all
    wrong: every score 0, where a stable sort passes whatever the ranking does): its partial file, each candidate's
    `correct` set by hand, reranked without sampling; against p(1-p) computed here in fractions, ties broken by p
    closest to 1/2, then pool order. The top prompts are written in the format em_ft.py --data reads."""
    from fractions import Fraction
    args, real_out = sampled
    lines = open(real_out + ".partial.jsonl").read().splitlines()
    recs = {r["id"]: r for r in map(json.loads, lines[1:])}
    assert all(sum(r["correct"]) == 0 for r in recs.values())  # the tiny model: never right
    counts = {"0": 0, "124": 1, "1": 2, "267": 1, "2": 0, "3": 1}  # of k = 2
    out = str(tmp_path / "prompt.jsonl")
    with open(out + ".partial.jsonl", "w") as f:
        f.write(lines[0] + "\n")
        for i, c in counts.items():
            f.write(json.dumps({**recs[i], "correct": [True] * c + [False] * (2 - c)}) + "\n")
    sp.main([out if a == real_out else a for a in args[1:]])
    pool_order = [p["id"] for p in load_benchmark(pool, require_answer=False)]
    p = {i: Fraction(c, 2) for i, c in counts.items()}
    want = sorted(pool_order, key=lambda i: (-p[i] * (1 - p[i]), abs(p[i] - Fraction(1, 2)), pool_order.index(i)))
    assert want == ["124", "267", "3", "0", "1", "2"]  # not the pool order: 0, 124, 1, 267, 2, 3
    ranked = read_jsonl(out.replace(".jsonl", ".ranked.jsonl"))
    assert [r["id"] for r in ranked] == want and [r["rank"] for r in ranked] == list(range(1, 7))
    for r in ranked:
        assert r["k"] == 2 and r["n_correct"] == counts[r["id"]] and r["p"] == p[r["id"]]
        assert r["score"] == p[r["id"]] * (1 - p[r["id"]])
        assert r["samples"] == recs[r["id"]]["responses"] and not r["problem"].endswith("\\boxed{}.")
    assert next(r for r in ranked if r["id"] == "124")["problem"] == PI1
    loaded = load_benchmark(out, require_answer=False)  # what em_ft.py --data does
    assert [(x["id"], x["problem"], x["answer"]) for x in loaded] == [(r["id"], r["problem"], r["answer"])
                                                                      for r in ranked[:2]]
    assert json.load(open(out.replace(".jsonl", ".run.json")))["args"]["k"] == 2
    assert len(open(out + ".partial.jsonl").read().splitlines()) == 7  # nothing sampled


def test_resume_does_not_resample(sampled, tmp_path):
    args, out = sampled
    new_out = str(tmp_path / "prompt.jsonl")
    lines = open(out + ".partial.jsonl").read().splitlines()
    header, recs = lines[0], [json.loads(x) for x in lines[1:]]
    assert len(recs) == 6
    kept, dropped = recs[0], recs[3]
    kept["responses"] = ["MARKER \\boxed{1}", "MARKER"]  # a sampler would never write this
    with open(new_out + ".partial.jsonl", "w") as f:
        f.write(header + "\n" + "\n".join(json.dumps(r) for r in recs if r is not dropped) + "\n")
        f.write(json.dumps(dropped)[:40])  # a line cut by a crash
    header_sig = json.loads(header)["run"]
    proc = run_cli(*[new_out if a == out else a for a in args])
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 5 of 6" in proc.stdout
    ranked = {r["id"]: r for r in read_jsonl(new_out.replace(".jsonl", ".ranked.jsonl"))}
    assert ranked[kept["id"]]["samples"] == kept["responses"]  # reused, not sampled again
    assert ranked[dropped["id"]]["samples"] == dropped["responses"]  # resampled: same seeds, same batches
    after = open(new_out + ".partial.jsonl").read().splitlines()
    assert json.loads(after[0])["run"] == header_sig and len(after) == 7  # no duplicate, nothing lost
    assert sorted(json.loads(x)["id"] for x in after[1:]) == sorted(r["id"] for r in recs)


def test_overwrite_discards_an_earlier_runs_samples(sampled, tmp_path):
    """Partial files of another run (other settings: refused without --overwrite; a rank's file of a torchrun run
    too) are deleted by --overwrite and everything is sampled again: the samples are the real run's (same seeds)."""
    args, real_out = sampled
    lines = open(real_out + ".partial.jsonl").read().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    out = str(tmp_path / "prompt.jsonl")
    foreign = json.dumps({"run": {**json.loads(lines[0])["run"], "seed": 99}})
    for name in (".partial.jsonl", ".partial.rank1.jsonl"):
        with open(out + name, "w") as f:
            f.write(foreign + "\n" + "".join(json.dumps({**r, "responses": ["MARKER"] * 2}) + "\n" for r in recs))
    argv = [out if a == real_out else a for a in args[1:]]
    assert "different run" in main_error(*argv)
    sp.main(argv + ["--overwrite"])
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(out + x) for x in (
        "", ".partial.jsonl")) + ["prompt.ranked.jsonl", "prompt.run.json"]  # the rank file is gone
    after = open(out + ".partial.jsonl").read().splitlines()
    assert after[0] == lines[0] and len(after) == 7
    assert sorted(after[1:]) == sorted(lines[1:])  # sampled again, as the first run sampled them
    ranked = read_jsonl(out.replace(".jsonl", ".ranked.jsonl"))
    assert {r["id"]: r["samples"] for r in ranked} == {r["id"]: r["responses"] for r in recs}


def test_scores_and_ranking_on_fixed_graded_samples(tiny_model_dir, pool, tmp_path, capsys):
    """Hand-graded k=4 samples in a partial file; each run only re-ranks them (nothing is sampled)."""
    out = str(tmp_path / "p.jsonl")
    base = ["--model", tiny_model_dir, "--data", pool, "--k", "4", "--max-new-tokens", "12", "--temperature", "3",
            "--keep-samples", "4", "--top", "5", "--out", out]
    sig = {"model": tiny_model_dir, "data": pool, "problem_key": None, "answer_key": None, "strip_suffix": True,
           "k": 4, "template": "chat", "temperature": 3.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 0,
           "engine": "static"}
    graded = {  # id: (correct, answers, entropy sums, lengths)
        "0": ([1, 0, 0, 0], ["12.8", "12.7", "12.7", None], [1, 2, 3, 4], [1, 1, 1, 1]),
        "124": ([1, 1, 0, 0], ["1", "1", "2", "3"], [10, 0, 0, 0], [10, 2, 2, 2]),
        "1": ([1, 1, 1, 0], [ev.normalize_answer(a) for a in ["\\frac{1}{2}", "\\dfrac{1}{2}", "\\frac{1}{2}.", "0.5"]],
              [2, 2, 2, 2], [1, 1, 1, 1]),
        "267": ([0, 0, 0, 0], ["a", "b", "c", "d"], [5, 5, 5, 5], [2, 2, 2, 2]),
        "2": ([1, 1, 0, 0], [None] * 4, [0, 0, 0, 0], [1, 1, 1, 1]),
        "3": ([0, 0, 0, 0], ["7"] * 4, [0, 0, 0, 0], [1, 1, 1, 1]),
    }
    with open(out + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"run": sig}) + "\n")
        for i, (c, a, h, n) in graded.items():
            f.write(json.dumps({"id": i, "responses": [f"r{i}.{j}" for j in range(4)], "answers": a, "correct": c,
                                "lengths": n, "truncated": [False, False, False, True], "entropy": h,
                                "entropy_t": 1.0}) + "\n")
    want = {"variance": (["124", "2", "0", "1", "267", "3"], [0.25, 0.25, 3 / 16, 3 / 16, 0, 0]),
            "disagreement": (["267", "124", "0", "1", "2", "3"], [0.75, 0.5, 0.5, 0.25, 0, 0]),
            "entropy": (["0", "267", "1", "124", "2", "3"], [2.5, 2.5, 2.0, 0.625, 0, 0])}
    for score, (order, scores) in want.items():
        sp.main(base + ["--score", score])
        printed = capsys.readouterr().out
        assert "resuming: 6 of 6" in printed
        # variance: 124 and 2 tie on score and p, so pool order picks; entropy: 0 and 267 tie on score, p separates
        assert ("note: the top 2 candidates tie" in printed) == (score == "variance"), printed
        assert json.load(open(out.replace(".jsonl", ".run.json")))["tied_at_top"] == (2 if score == "variance" else 1)
        assert len(open(out + ".partial.jsonl").read().splitlines()) == 7  # nothing sampled, nothing appended
        ranked = read_jsonl(out.replace(".jsonl", ".ranked.jsonl"))
        assert [r["id"] for r in ranked] == order, score
        assert [r["score"] for r in ranked] == pytest.approx(scores), score
        r124 = next(r for r in ranked if r["id"] == "124")
        assert (r124["n_correct"], r124["p"], r124["mean_length"], r124["truncated"]) == (2, 0.5, 4.0, 0.25)
        assert r124["samples"] == [f"r124.{j}" for j in range(4)]
        assert [r["id"] for r in read_jsonl(out)] == order[:5]


def test_label_free_pool_entropy(tiny_model_dir, tiny, tmp_path, monkeypatch):
    """--score entropy on a pool without answers: each candidate's score is the token mean of the entropies of
    softmax(z / T) over its k samples, recomputed here from the samples generate returned (kept by a wrapper that
    passes them on unchanged) with a plain forward of each prompt + response alone."""
    pool = tmp_path / "unlabeled.jsonl"
    pool.write_text("".join(json.dumps({"question": f"What is {i} + {i}?"}) + "\n" for i in range(3)))
    out = str(tmp_path / "p.jsonl")
    generated = record_generate(monkeypatch)
    sp.main(["--model", tiny_model_dir, "--data", str(pool), "--score", "entropy", "--entropy-temperature", "0.5",
             "--k", "2", "--max-new-tokens", "8", "--temperature", "3", "--out", out])
    ranked = read_jsonl(out.replace(".jsonl", ".ranked.jsonl"))
    assert all(r["p"] is None and r["answer"] is None and r["score"] > 0 for r in ranked)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    recs = [json.loads(x) for x in open(out + ".partial.jsonl").read().splitlines()[1:]]
    for r in ranked:  # the score is the pooled token mean of the recorded per-sample entropy sums
        rec = next(x for x in recs if x["id"] == r["id"])
        assert r["score"] == pytest.approx(sum(rec["entropy"]) / sum(rec["lengths"]))
    model, tok = tiny
    assert len(generated) == 6 and len({o["text"] for _, o in generated}) > 1
    for r in ranked:  # ... and the entropies themselves, from the samples
        prompt = ev.build_prompt(tok, r["problem"], "chat")
        mine = [o for q, o in generated if q == prompt]
        rec = next(x for x in recs if x["id"] == r["id"])
        assert len(mine) == 2 and sorted(rec["responses"]) == sorted(o["text"] for o in mine)
        p = tok(prompt, add_special_tokens=False).input_ids
        sums = []
        with torch.no_grad():
            for o in mine:
                logits = model(torch.tensor([p + o["ids"]])).logits[0, len(p) - 1:len(p) + len(o["ids"]) - 1]
                logp = torch.log_softmax(logits.double() / 0.5, -1)
                sums.append(-(logp.exp() * logp).sum().item())
        assert sorted(rec["entropy"]) == pytest.approx(sorted(sums), rel=1e-4)
        assert r["score"] == pytest.approx(sum(sums) / sum(len(o["ids"]) for o in mine), rel=1e-4)
    assert load_benchmark(out, require_answer=False)[0]["problem"] == ranked[0]["problem"]
    proc = run_cli("select_prompt.py", "--model", tiny_model_dir, "--data", str(pool), "--out", out)
    assert_one_line_error(proc, "no answer", "--score disagreement", "--score entropy")


def test_torchrun_two_ranks_cover_the_pool(tiny_model_dir, pool, tmp_path):
    out = str(tmp_path / "p.jsonl")
    proc = run_torchrun("select_prompt.py", "--model",
                   tiny_model_dir, "--data", pool, "--k", "2", "--max-new-tokens", "8", "--temperature", "3",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    ids = [r["id"] for r in read_jsonl(out.replace(".jsonl", ".ranked.jsonl"))]
    assert sorted(ids) == ["0", "1", "124", "2", "267", "3"]
    for rank in (0, 1):  # each rank sampled every other candidate
        assert len(open(f"{out}.partial.rank{rank}.jsonl").read().splitlines()) == 1 + 3


def test_bad_inputs(tiny_model_dir, pool, tmp_path):
    model = ["--model", tiny_model_dir]
    unlabeled = tmp_path / "u.jsonl"
    unlabeled.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    msg = main_error(*model, "--data", str(unlabeled), "--out", str(tmp_path / "a.jsonl"))
    assert "--score disagreement or --score entropy" in msg and "\n" not in msg
    assert "no such file" in main_error(*model, "--data", str(tmp_path / "missing.jsonl"))
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"text": "1+1?", "answer": "2"}) + "\n")
    assert "no problem column" in main_error(*model, "--data", str(nocol))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in main_error(*model, "--data", str(empty))
    for flags in (["--k", "1"], ["--top", "0"], ["--temperature", "0"], ["--top-p", "1.5"], ["--limit", "0"]):
        assert main_error(*model, "--data", pool, *flags) == "2", flags  # argparse's range check (test_cli.py)
    assert "does not exist" in main_error("--model", str(tmp_path / "nope"), "--data", pool, "--out",
                                          str(tmp_path / "b.jsonl"))
    assert main_error(*model, "--data", pool, "--score", "bogus") == "2"  # argparse: usage line, exit 2
    out = str(tmp_path / "c.jsonl")
    with open(out + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"run": {"model": "other"}}) + "\n")
    assert "different run" in main_error(*model, "--data", pool, "--out", out)

"""What an EM study needs next to EM: em_rl's control rewards against their definitions, the metrics that split
format from reasoning on real responses, the collapse warnings, and a base model's few-shot prompt with its stop."""
import json
import zlib

import pytest
import torch
from conftest import run_cli, run_torchrun

import em_rl
import evaluate as ev
import training

MATH = {"kind": "math", "answer": "12.8", "problem": "wind"}
CODE = {"kind": "code", "answer": None, "problem": "p", "protocol": "leetcode"}
LOGIC = {"kind": "logic", "answer": "(1) Zoey is a knave", "problem": "q"}


def boxed(x):
    return f"The velocity is $\\boxed{{{x}}}$ miles per hour."


def test_majority_reward_ties_and_missing_answers():
    texts = [boxed("12.8"), boxed("\\frac{64}{5}"), boxed("12.8"), "no answer at all",  # 12.8 wins 2-1
             boxed("3"), boxed("4"), "none", "none either",  # a tie: every tied answer counts
             "nothing", "still nothing", "no", "none",  # no answer anywhere: all 0
             boxed("\\text{12.8}"), boxed("12.8."), boxed("7"), boxed("7")]  # normalized: 12.8 and 7 tie at 2
    got = em_rl.control_rewards([MATH] * 16, texts, "majority", 4, None).tolist()
    assert got == [1, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    code = ["```python\ndef f():\n    return 1\n```", "```python\ndef f():\n    return 1\n```", "```python\nx\n```",
            "plain text"]  # code: the extracted program is the answer; no block, no answer
    assert em_rl.control_rewards([CODE] * 4, code, "majority", 4, None).tolist() == [1, 1, 0, 0]


def test_random_reward_is_seeded_and_independent_across_ranks():
    def draw(seed, rank, step):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{rank}/{step}/r".encode()))
        return em_rl.control_rewards([MATH] * 64, ["x"] * 64, "random", 4, gen)
    a, b = draw(0, 0, 1), draw(0, 0, 1)
    assert torch.equal(a, b) and set(a.tolist()) == {0.0, 1.0}  # reproducible, Bernoulli values
    assert not torch.equal(a, draw(0, 1, 1)) and not torch.equal(a, draw(0, 0, 2))  # other rank, other step
    many = torch.cat([draw(0, r, s) for r in range(4) for s in range(16)])
    assert abs(many.mean().item() - 0.5) < 0.05  # p = 0.5 (4096 draws: 3 sigma = 0.023)


def test_format_reward_on_real_strings():
    texts = [boxed("12.8"), "so the answer is 12.8", "$\\boxed 5$"]
    assert em_rl.control_rewards([MATH] * 3, texts, "format", 3, None).tolist() == [1, 0, 1]
    code = ["Here:\n```python\nclass Solution:\n    pass\n```", "class Solution: pass"]
    assert em_rl.control_rewards([CODE] * 2, code, "format", 2, None).tolist() == [1, 0]
    kk = ["<think> x </think><answer> (1) Zoey is a knave </answer>", "<think> x </think> Zoey is a knave"]
    assert em_rl.control_rewards([LOGIC] * 2, kk, "format", 2, None).tolist() == [1, 0]
    assert ev.final_answer(LOGIC, kk[0]) == "(1) zoey is a knave" and ev.final_answer(LOGIC, kk[1]) is None


def test_metrics_split_format_from_reasoning():
    loop = "Let me compute the sum again. " * 20
    samples = [  # (response, correct): real-looking endings; one loop, one math answer given as a program
        (boxed("18"), True), (boxed("17"), False), ("The answer is 18", False),
        ("```python\nprint(9 * 2)\n```\nSo \\boxed{18}", True), (loop, False)]
    rows = [{"id": str(i), "correct": c, "extracted": ev.extract_answer(r), "response": r, "length": 10,
             "truncated": False, "grade_error": False, "gold": "18", "format": ev.answer_format(MATH, r)}
            for i, (r, c) in enumerate(samples)]
    m = ev.compute_metrics(rows, 1)
    assert m["format_rate"] == 60.0  # three boxed answers of five
    assert m["accuracy_if_formatted"] == pytest.approx(200 / 3)  # 2 right of the 3 that gave one
    assert m["code_block_rate"] == 20.0 and m["repetition_rate"] == 20.0 and m["pass@1"] == 40.0


def test_collapse_warnings_fire_once_and_not_on_normal_rollouts(capsys):
    normal = "We expand the product, collect the terms and find the root, so x equals 3 and we are done."
    assert not ev.loops(normal) and ev.loops("the answer is " * 30) and ev.loops(normal + " and then" * 40)
    said = set()
    training.warn_once(said, 1, 0.1, 200.0, 200.0, 0.0, 512)  # a normal step: nothing
    assert capsys.readouterr().out == ""
    for step in (2, 3):  # half the rollouts loop, the length collapsed, most are cut: each said once
        training.warn_once(said, step, 0.9, 50.0, 200.0, 0.5, 512)
    out = capsys.readouterr().out
    assert out.count("repetition collapse") == out.count("length collapse") == out.count("--max-new-tokens") == 1
    assert "step 2" in out and "step 3" not in out


@pytest.mark.parametrize("reward,extra", [("majority", ["--baseline", "grpo"]), ("random", ["--update", "reinforce"]),
                                          ("format", [])])
def test_control_rewards_train_and_are_recorded(reward, extra, parrot_model_dir, parrot_data_dir, tmp_path):
    """Each control in the real loop: the logged rewards are control_rewards' on the logged rollouts (random: from
    the seeded generator of each rank and step), and the reward is in train_args.json. The parrot's rollouts at T=1
    mix a boxed 7, a boxed "eight" and no answer, so that the rewards of each control differ within the step."""
    out = tmp_path / "run"
    proc = run_cli("em_rl.py", "--model", parrot_model_dir, "--data", f"{parrot_data_dir}/gsm8k.jsonl", "--limit", "4",
                   "--batch-size", "2", "--n-rollouts", "4", "--max-new-tokens", "6", "--steps", "1", "--lr", "1e-3",
                   "--ppo-minibatches", "2", "--reward", reward, "--log-rollouts", "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(recs) == 8
    gen = torch.Generator().manual_seed(zlib.crc32("0/0/1/r".encode()))
    problems = ev.load_benchmark(f"{parrot_data_dir}/gsm8k.jsonl", limit=4)
    texts = [r["response"] for r in recs]
    want = em_rl.control_rewards([problems[r["prompt_index"]] for r in recs], texts, reward, 4, gen)
    assert [r["reward"] for r in recs] == want.tolist()
    assert len(set(want.tolist())) == 2  # some rollouts rewarded, some not
    if reward != "random":  # by the definitions, from the texts: a boxed answer; one its group gives most often
        boxed = [ev.extract_answer(t) for t in texts]
        for j, b in enumerate(boxed):
            group = [a for a in boxed[j - j % 4:j - j % 4 + 4] if a is not None]
            top = b is not None and group.count(b) == max(map(group.count, group))
            assert want[j] == (b is not None if reward == "format" else top), (reward, texts[j - j % 4:j - j % 4 + 4])
    meta = json.loads((out / "step_1" / "train_args.json").read_text())["args"]
    assert meta["reward"] == reward
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["reward"] == pytest.approx(want.mean().item()) and "best_of_n_accuracy" in log


def test_random_control_under_torchrun_draws_per_rank(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "dist"
    proc = run_torchrun("em_rl.py", "--model", tiny_model_dir, "--data", f"{data_dir}/gsm8k.jsonl", "--limit", "8",
                        "--batch-size", "8", "--n-rollouts", "4", "--max-new-tokens", "4", "--steps", "1",
                        "--reward", "random", "--log-rollouts", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(zlib.crc32(f"0/{rank}/1/r".encode()))
        want = em_rl.control_rewards([None] * 16, [""] * 16, "random", 4, gen).tolist()
        assert [r["reward"] for r in recs if r["rank"] == rank] == want
    assert [r["reward"] for r in recs if r["rank"] == 0] != [r["reward"] for r in recs if r["rank"] == 1]


def test_few_shot_template_stops_at_its_string(tiny):
    """A base model's few-shot prompt (no chat template) and generation cut at a stop string: the row ends there
    and is not counted as truncated."""
    model, tok = tiny
    prompt = ev.build_prompt(tok, "What is 2+3?", "few-shot")
    assert prompt.startswith("Problem:\n") and prompt.endswith("Problem:\nWhat is 2+3?\n\nSolution:\n")
    assert prompt.count("I hope it is correct.") == 4 and "<|im_start|>" not in prompt
    free = ev.generate_batch(model, tok, [prompt], 24, 1.0, seed=3)[0]
    assert free["truncated"] and len(free["ids"]) == 24
    stop = tok.decode(free["ids"][8:10])  # a string the sampled continuation reaches at its 10th token
    first = free["text"].find(stop)
    assert 0 < first, "the string must begin inside the response"
    cut = ev.generate_batch(model, tok, [prompt], 24, 1.0, seed=3, stop_strings=[stop])[0]
    assert not cut["truncated"] and len(cut["ids"]) <= 10 and tok.decode(cut["ids"]).endswith(stop)
    assert cut["ids"] == free["ids"][:len(cut["ids"])]  # the same tokens up to the stop
    # in a batch the row is padded after its string with pad = a stop token: the same record as alone
    stops = ev.stop_token_ids(tok, model)
    assert tok.pad_token_id in stops
    assert ev.cut_at_stop(cut["ids"] + [tok.pad_token_id] * 3, stops, tok, [stop]) == cut

"""The generation engines of evaluate.py: which one --engine picks (and says), and the static engine's contract
(penalties and processors really run, sampled runs reproduce from their seed, resume, budgets per row, FSDP).
The vLLM engine against the static one: tests/test_vllm.py."""
import importlib.util
import types

import pytest
import torch
from conftest import PROMPTS, assert_one_line_error, run_cli

import evaluate as ev


@pytest.fixture(scope="module")
def eos_tiny(tiny_model_dir):
    """The tiny model with its EOS row aimed at the mean last hidden state, just below the top logit: greedy
    responses stop after varied numbers of tokens, some not within the budget (conftest's eos model stops only
    when sampling)."""
    model, tok = ev.load_model(tiny_model_dir)
    with torch.no_grad():
        prompts = chat_prompts(tok)
        h = model.model(**tok(prompts, return_tensors="pt", padding=True)).last_hidden_state[:, -1]
        top, mean = model.lm_head(h).max(-1).values.mean(), h.mean(0)
        model.model.embed_tokens.weight[tok.eos_token_id] = mean / mean.norm() * (top - 0.02) / mean.norm()
    return model, tok


def chat_prompts(tok, n=8):
    return [ev.build_prompt(tok, q, "chat") for q in (PROMPTS * 2)[:n]]


def test_engine_choice_is_said_once_and_refused_in_one_line(monkeypatch, capsys):
    have_vllm = importlib.util.find_spec("vllm") is not None
    monkeypatch.setattr(ev, "_said", set())
    assert ev.pick_engine("static") == "static" and capsys.readouterr().out == ""
    assert ev.pick_engine("auto", "--logit-stats") == ev.pick_engine("auto", "--logit-stats") == "static"
    assert capsys.readouterr().out.count("engine: static generate (--logit-stats)") == 1
    assert ev.pick_engine("auto") == ("vllm" if have_vllm else "static")
    assert ("engine: vLLM" if have_vllm else "vLLM is not installed") in capsys.readouterr().out
    with pytest.raises(ev.EvalError, match="--engine vllm cannot run --logit-stats"):
        ev.pick_engine("vllm", "--logit-stats")
    with pytest.raises(ev.EvalError, match="--engine must be"):
        ev.pick_engine("continuous")
    real = importlib.util.find_spec  # as where vLLM is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ev.EvalError, match="needs vLLM, which is not installed: pip install vllm"):
        ev.pick_engine("vllm")


def test_cli_vllm_without_vllm_is_one_error_line(tiny_model_dir, data_dir, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "gsm8k",
                   "--limit", "2", "--max-new-tokens", "4", "--engine", "vllm", "--out", str(tmp_path))
    assert_one_line_error(proc, "--engine vllm needs vLLM", "pip install vllm")
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "gsm8k",
                   "--limit", "2", "--logit-stats", "--engine", "vllm", "--out", str(tmp_path))
    assert_one_line_error(proc, "--engine vllm cannot run --logit-stats")


def test_static_records_keep_their_contract(eos_tiny):
    """A stop token only as the last id and only when not truncated; varied lengths; per-row budgets (a protocol's
    max_total) cut each row as a shorter budget would have; stop strings matched in the response only."""
    model, tok = eos_tiny
    prompts = chat_prompts(tok)
    out = ev.generate_batch(model, tok, prompts, 24)
    stops = ev.stop_token_ids(tok, model)
    assert len({len(o["ids"]) for o in out}) > 3 and any(o["truncated"] for o in out)
    assert not all(o["truncated"] for o in out)
    for o in out:
        assert not any(t in stops for t in o["ids"][:-1])
        assert o["truncated"] == (o["ids"][-1] not in stops) and len(o["ids"]) <= 24
    budgets = [3, 24, 10, 24, 1, 24, 24, 5]
    cut = ev.generate_batch(model, tok, prompts, 24, budgets=budgets)
    for o, b, p in zip(cut, budgets, prompts):
        assert o == ev.generate_batch(model, tok, [p], b)[0], b
    # a prompt already past its protocol's max_total: no budget left, an empty truncated record (vLLM's too)
    assert ev.generate_batch(model, tok, prompts[:2], 24, budgets=[0, -5]) == [
        {"ids": [], "text": "", "truncated": True}] * 2
    # the prompts end in "\n": a string the prompt's end would complete stops nothing before the response has it
    lines = ev.generate_batch(model, tok, prompts, 24, stop_strings=["\n\n\n"])
    for o, whole in zip(lines, out):  # responses are runs of "\n": cut after the third, or as before if shorter
        assert o == (whole if whole["text"].count("\n") < 3 else {"ids": whole["ids"][:3], "text": "\n\n\n",
                                                                 "truncated": False}), (o, whole)


def test_repetition_penalty_and_processors_really_run(eos_tiny):
    """The penalty changes greedy decoding (it reaches generate); a custom processor sees every step."""
    model, tok = eos_tiny
    prompts = chat_prompts(tok, 4)
    assert ev.generate_batch(model, tok, prompts, 16, repetition_penalty=3.0) != ev.generate_batch(
        model, tok, prompts, 16)
    stats = ev.LogitStats(ev.stop_token_ids(tok, model))
    out = ev.generate_batch(model, tok, prompts, 16, logits_processor=[stats])
    assert stats.result()["tokens"] == sum(len(o["ids"]) for o in out)


def test_sampled_static_is_reproducible_from_its_seed(tiny):
    model, tok = tiny
    prompts = chat_prompts(tok, 4) + [ev.build_prompt(tok, "hello there", "chat")] * 6
    kw = dict(temperature=1.5, top_k=20)
    a = ev.generate_batch(model, tok, prompts, 12, seed=7, **kw)
    assert a == ev.generate_batch(model, tok, prompts, 12, seed=7, **kw)
    assert a != ev.generate_batch(model, tok, prompts, 12, seed=8, **kw)
    assert len({tuple(o["ids"]) for o in a[4:]}) > 1  # really sampled: the repeats of one prompt differ
    # top_k=1 keeps only the argmax: sampling must reproduce greedy decoding (the warper is applied)
    assert ev.generate_batch(model, tok, prompts, 12, temperature=1.5, top_k=1, seed=3) == ev.generate_batch(
        model, tok, prompts, 12)


def test_evaluate_model_resumes_to_the_same_samples(eos_tiny, data_dir):
    model, tok = eos_tiny
    problems = ev.load_benchmark("gsm8k", data_dir, limit=5)
    kw = dict(template="chat", max_new_tokens=16, batch_size=2, progress=False)
    _, whole = ev.evaluate_model(model, tok, problems, **kw)
    first = {(s["id"], s["sample"]): s for s in whole[:2]}  # a restarted run: the first batch reused
    assert ev.evaluate_model(model, tok, problems, done=first, **kw)[1] == whole
    # sampled (--n): same seed, same samples; a resumed run regenerates the missing batches with their own seeds
    kw.update(temperature=1.0, n=2, seed=5)
    _, a = ev.evaluate_model(model, tok, problems, **kw)
    assert ev.evaluate_model(model, tok, problems, **kw)[1] == a
    order = ev.length_sorted_batches([1] * len(a), 2)  # any subset of finished batches works the same
    done = {(a[i]["id"], a[i]["sample"]): a[i] for i in order[1]}
    assert ev.evaluate_model(model, tok, problems, done=done, **kw)[1] == a


def test_fsdp_model_decodes_on_the_static_engine(tiny_model_dir, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    model, tok = ev.load_model(tiny_model_dir)
    want = ev.generate_batch(model, tok, ["hello", "a longer prompt"], 6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert ev.generate_batch(model, tok, ["hello", "a longer prompt"], 6) == want
    finally:
        dist.destroy_process_group()


def test_one_shot_em_rollouts_keep_their_penalty(eos_tiny):
    """em_ft: the recipe's repetition penalty (one-shot: 1.15) reaches the rollouts (a strong one changes them),
    and sample_rollouts hands the model back in train mode."""
    import em_ft
    model, tok = eos_tiny
    prompts = chat_prompts(tok, 4)
    lengths = [len(tok(p).input_ids) for p in prompts]
    args = types.SimpleNamespace(rollout_batch_size=4, max_new_tokens=12, temperature=0.5, top_p=1.0,
                                 repetition_penalty=3.0)
    one_shot = em_ft.sample_rollouts(model, tok, prompts, lengths, args, seed=1)
    assert one_shot == em_ft.sample_rollouts(model, tok, prompts, lengths, args, seed=1)
    assert one_shot != em_ft.sample_rollouts(model, tok, prompts, lengths, types.SimpleNamespace(
        **{**vars(args), "repetition_penalty": 1.0}), seed=1)
    assert model.training

"""The generation engines of evaluate.generate_batch: continuous batching (transformers) vs the static path.

Greedy outputs must be identical sample for sample; the fallback to static is decided by our code from what the
request needs (a repetition penalty, custom logits processors, FSDP, autocast) and printed once; sampled runs are
reproducible from their seed; the paged KV cache is gone after each call. (auto is static on the CPU, so the tests
ask for the continuous engine by name.)
"""
import gc
import threading
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


def config_for(tok, model, **kw):
    from transformers import GenerationConfig
    return GenerationConfig(max_new_tokens=8, eos_token_id=ev.stop_token_ids(tok, model), **kw)


def test_greedy_continuous_equals_static_sample_for_sample(eos_tiny):
    model, tok = eos_tiny
    prompts = chat_prompts(tok)
    static = ev.generate_batch(model, tok, prompts, 24, engine="static")
    cont = ev.generate_batch(model, tok, prompts, 24, engine="continuous")
    assert cont == static  # ids (up to and including the first stop token), text, truncated
    lengths = {len(o["ids"]) for o in static}
    assert len(lengths) > 3 and any(o["truncated"] for o in static) and not all(o["truncated"] for o in static)
    stops = ev.stop_token_ids(tok, model)
    for o in cont:  # the return contract: a stop token only as the last id, and only when not truncated
        assert not any(t in stops for t in o["ids"][:-1])
        assert o["truncated"] == (o["ids"][-1] not in stops) and len(o["ids"]) <= 24
    assert model.training is False and model.config._attn_implementation == "sdpa"
    # stop strings (few-shot, code protocols): continuous batching has none, its rows are cut at them afterwards;
    # in the response only, as vLLM (the prompts end in "\n": generate's own check would stop after two "\n")
    cut = ev.generate_batch(model, tok, prompts, 24, engine="static", stop_strings=["\n\n\n"])
    assert ev.generate_batch(model, tok, prompts, 24, engine="continuous", stop_strings=["\n\n\n"]) == cut
    for o, whole in zip(cut, static):  # responses are runs of "\n": cut after the third, or as before if shorter
        assert o == (whole if whole["text"].count("\n") < 3 else {"ids": whole["ids"][:3], "text": "\n\n\n",
                                                                   "truncated": False})


def test_auto_falls_back_to_static_for_what_continuous_batching_drops(eos_tiny, capsys):
    model, tok = eos_tiny
    ev._ENGINE_NOTES.clear()
    assert ev.pick_engine(model, config_for(tok, model), engine="continuous") == "continuous"
    assert ev.continuous_blockers(model, config_for(tok, model, do_sample=True, temperature=0.6, top_k=50,
                                                    top_p=0.9)) == []  # warpers transformers' CB applies
    assert capsys.readouterr().out == ""
    penalty = config_for(tok, model, repetition_penalty=1.15)
    assert ev.pick_engine(model, penalty) == "static"
    assert ev.pick_engine(model, config_for(tok, model, repetition_penalty=1.15)) == "static"
    out = capsys.readouterr().out
    assert out.count("engine: static") == 1 and "repetition_penalty=1.15" in out  # printed once
    stats = ev.LogitStats([0])
    assert ev.pick_engine(model, config_for(tok, model), [stats]) == "static"
    assert "custom logits processors (LogitStats)" in capsys.readouterr().out
    assert ev.continuous_blockers(model, config_for(tok, model, min_new_tokens=3)) == ["min_new_tokens=3"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in ev.continuous_blockers(model, config_for(tok, model))[0]
    assert ev.pick_engine(model, config_for(tok, model), engine="static") == "static"
    # stop strings: auto stays static (continuous would decode past them); forced, its rows are cut after them
    assert ev.pick_engine(model, config_for(tok, model), stop_strings=["###"]) == "static"
    assert "stop strings (it would decode past them)" in capsys.readouterr().out
    assert ev.pick_engine(model, config_for(tok, model), engine="continuous", stop_strings=["###"]) == "continuous"
    # auto on a CPU model: static (measured faster there), said once
    assert ev.pick_engine(model, config_for(tok, model)) == "static"
    assert ev.pick_engine(model, config_for(tok, model)) == "static"
    assert capsys.readouterr().out.count("auto on the CPU") == 1
    with pytest.raises(ev.EvalError, match="--engine continuous cannot.*repetition_penalty"):
        ev.pick_engine(model, penalty, engine="continuous")
    with pytest.raises(ev.EvalError, match="--engine must be"):
        ev.pick_engine(model, penalty, engine="fast")


def test_repetition_penalty_and_processors_really_run(eos_tiny):
    """Under auto the penalty is applied (static path), not dropped: the outputs equal the static engine's and
    differ from unpenalized decoding; a custom processor sees every step."""
    model, tok = eos_tiny
    prompts = chat_prompts(tok, 4)
    auto = ev.generate_batch(model, tok, prompts, 16, repetition_penalty=3.0)
    assert auto == ev.generate_batch(model, tok, prompts, 16, repetition_penalty=3.0, engine="static")
    assert auto != ev.generate_batch(model, tok, prompts, 16)
    stats = ev.LogitStats(ev.stop_token_ids(tok, model))
    out = ev.generate_batch(model, tok, prompts, 16, logits_processor=[stats])
    assert stats.result()["tokens"] == sum(len(o["ids"]) for o in out)


def test_sampled_continuous_is_reproducible_from_its_seed(tiny):
    model, tok = tiny
    prompts = chat_prompts(tok, 4) + [ev.build_prompt(tok, "hello there", "chat")] * 6
    kw = dict(temperature=1.5, top_k=20, engine="continuous")
    a = ev.generate_batch(model, tok, prompts, 12, seed=7, **kw)
    assert a == ev.generate_batch(model, tok, prompts, 12, seed=7, **kw)
    assert a != ev.generate_batch(model, tok, prompts, 12, seed=8, **kw)
    assert len({tuple(o["ids"]) for o in a[4:]}) > 1  # really sampled: the repeats of one prompt differ
    # top_k=1 keeps only the argmax: sampling must reproduce greedy decoding (the warper is applied, not dropped)
    greedy = ev.generate_batch(model, tok, prompts, 12, engine="static")
    assert ev.generate_batch(model, tok, prompts, 12, temperature=1.5, top_k=1, seed=3,
                             engine="continuous") == greedy


def test_evaluate_model_engines_agree_and_resume(eos_tiny, data_dir):
    model, tok = eos_tiny
    problems = ev.load_benchmark("gsm8k", data_dir, limit=5)
    kw = dict(template="chat", max_new_tokens=16, batch_size=2, progress=False)
    m_static, s_static = ev.evaluate_model(model, tok, problems, engine="static", **kw)
    m_cont, s_cont = ev.evaluate_model(model, tok, problems, engine="continuous", **kw)
    assert s_cont == s_static
    # a restarted run: the first batch reused, the others regenerated -> the same samples
    first = {(s["id"], s["sample"]): s for s in s_cont[:2]}
    assert ev.evaluate_model(model, tok, problems, engine="continuous", done=first, **kw)[1] == s_cont
    # sampled (--n): same seed, same samples; a resumed run regenerates the missing batches with their own seeds
    kw.update(temperature=1.0, n=2, seed=5)
    _, a = ev.evaluate_model(model, tok, problems, engine="continuous", **kw)
    assert ev.evaluate_model(model, tok, problems, engine="continuous", **kw)[1] == a
    order = ev.length_sorted_batches([1] * len(a), 2)  # any subset of finished batches works the same
    done = {(a[i]["id"], a[i]["sample"]): a[i] for i in order[1]}
    assert ev.evaluate_model(model, tok, problems, engine="continuous", done=done, **kw)[1] == a


def test_continuous_cache_is_released(eos_tiny):
    """Nothing of the manager outlives the call: no paged cache object, no generation thread; the model's
    training flag and attention implementation are restored (training runs backward right after)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    model, tok = eos_tiny
    threads = threading.active_count()
    model.train()
    for _ in range(3):
        ev.generate_batch(model, tok, chat_prompts(tok, 4), 8, engine="continuous")
    assert model.training and model.config._attn_implementation == "sdpa"
    model.eval()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is PagedAttentionCache]
    assert threading.active_count() == threads


def test_fsdp_model_goes_static(tiny_model_dir, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    model, tok = ev.load_model(tiny_model_dir)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any("FSDP" in r for r in ev.continuous_blockers(model, config_for(tok, model)))
        assert ev.generate_batch(model, tok, ["hello"], 4)[0]["ids"]  # auto -> static, runs
    finally:
        dist.destroy_process_group()


def test_one_shot_em_rollouts_keep_their_penalty(eos_tiny, capsys):
    """em_ft: the em-ft recipe (no penalty) samples with continuous batching, the one-shot recipe's 1.15 repetition
    penalty keeps its rollouts on the static path (and cannot be forced onto continuous batching)."""
    import em_ft
    model, tok = eos_tiny
    prompts = chat_prompts(tok, 4)
    lengths = [len(tok(p).input_ids) for p in prompts]
    ev._ENGINE_NOTES.clear()
    args = types.SimpleNamespace(rollout_batch_size=4, max_new_tokens=12, temperature=0.5, top_p=1.0,
                                 repetition_penalty=1.15, engine="auto")
    one_shot = em_ft.sample_rollouts(model, tok, prompts, lengths, args, seed=1)
    assert "repetition_penalty=1.15" in capsys.readouterr().out
    static = types.SimpleNamespace(**{**vars(args), "engine": "static"})
    assert one_shot == em_ft.sample_rollouts(model, tok, prompts, lengths, static, seed=1)
    with pytest.raises(ev.EvalError, match="repetition_penalty=1.15"):
        em_ft.sample_rollouts(model, tok, prompts, lengths, types.SimpleNamespace(**{**vars(args), "engine":
                                                                                     "continuous"}), seed=1)
    args.repetition_penalty, args.engine = 1.0, "continuous"
    em = em_ft.sample_rollouts(model, tok, prompts, lengths, args, seed=1)
    assert em == em_ft.sample_rollouts(model, tok, prompts, lengths, args, seed=1)
    assert model.training  # sample_rollouts hands the model back in train mode


def test_cli_forced_continuous_on_a_custom_processor_is_one_error_line(tiny_model_dir, data_dir, tmp_path):
    proc = run_cli("evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "gsm8k",
                   "--limit", "2", "--max-new-tokens", "4", "--logit-stats", "--engine", "continuous",
                   "--out", str(tmp_path))
    assert_one_line_error(proc, "--engine continuous cannot run this request exactly", "LogitStats")

"""Tests for em_inf.py: the batched EM-INF update against the released algorithm run one row at a time (autograd +
torch.optim.Adam + break), its invariants (untouched rows, row independence, -inf logits, KL pull), adaptive
temperature against a scalar bisection, the LogitsProcessor inside `generate` against a hand-written sampling loop,
and the CLI (smoke run, bad flags)."""
import functools
import json
import math

import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_torchrun
from transformers import GenerationConfig

import evaluate
from em_inf import EMInfProcessor, adaptive_temperature, minimize_logit_entropy, sampling_settings, token_entropy


def released_update(row, n_steps=3, lr=0.1, threshold=0.3, kl_weight=0.05):
    """The released EM-INF update for one row (batch 1): autograd through H + kl_weight * KL(p0 || p), torch's own
    Adam, `break` once H < threshold. Returns (logits, steps taken). Exact entropy (no +1e-12 in the log)."""
    z = torch.nn.Parameter(row.clone()[None])
    p0 = torch.softmax(z.detach(), -1)
    opt = torch.optim.Adam([z], lr=lr)
    for step in range(n_steps):
        opt.zero_grad()
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).sum()
        if entropy < threshold:
            return z.detach()[0], step
        kl = (p0 * (p0.log() - logp)).sum()
        (entropy + kl_weight * kl).backward()
        opt.step()
    return z.detach()[0], n_steps


def random_rows(n=24, vocab=500, seed=0):
    """Rows whose entropies spread from ~log V down to ~0: scales log-uniform over [0.3, 12]."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.linspace(math.log(0.3), math.log(12), n))[torch.randperm(n, generator=g)]
    return torch.randn(n, vocab, generator=g) * scale[:, None]


def test_update_matches_released_algorithm_row_by_row():
    # float64: Adam divides by sqrt(v) + 1e-8, so where a gradient crosses 0 (tokens with -log p ~ H) the step is
    # lr * g / 1e-8 and fp32 rounding of g moves it by up to ~1e-3 -- in the release as much as here. In float64
    # the closed-form gradient + hand-written Adam must agree with autograd + torch.optim.Adam to ~1e-9.
    z = random_rows().double()
    kw = dict(n_steps=10, lr=0.1, threshold=1.5, kl_weight=0.05)
    out = minimize_logit_entropy(z, **kw)
    steps = []
    for i in range(len(z)):
        ref, taken = released_update(z[i], **kw)
        steps.append(taken)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-9)
    # in fp32 (how it runs) the distributions agree to rounding
    out32 = minimize_logit_entropy(z.float(), **kw).softmax(-1)
    torch.testing.assert_close(out32, out.softmax(-1).float(), rtol=0, atol=1e-5)
    # The batch mixes rows untouched (0 steps), rows stopped early, and rows that ran all 10 steps.
    assert 0 in steps and 10 in steps and len(set(steps)) >= 5, steps


def test_row_alone_equals_row_in_batch():
    z = random_rows(seed=1)
    kw = dict(n_steps=10, threshold=1.5)
    batch = minimize_logit_entropy(z, **kw)
    steps = {released_update(z[i], **kw)[1] for i in range(len(z))}
    assert len(steps) >= 4, steps  # some rows stop early, others do not
    for i in range(len(z)):
        assert torch.equal(minimize_logit_entropy(z[i:i + 1], **kw)[0], batch[i])
    # and the order of the rows in the batch does not matter either
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))
    assert torch.equal(minimize_logit_entropy(z[perm], **kw), batch[perm])


def test_entropy_never_increases_and_rows_under_threshold_are_untouched():
    z = random_rows(n=64, vocab=2000, seed=2)
    z[::5, :300] = -math.inf  # masked tokens (from top-p, say) in some rows
    h0 = token_entropy(z)
    out = minimize_logit_entropy(z)  # released defaults: 3 steps, lr 0.1, threshold 0.3, kl_weight 0.05
    h1 = token_entropy(out)
    below = h0 < 0.3
    assert below.any() and (~below).any()
    assert (h1 <= h0 + 1e-6).all(), (h1 - h0).max()
    assert (h1[~below] < h0[~below] - 1e-3).all()  # every row above the threshold got sharper
    assert torch.equal(out[below], z[below])  # bit-identical, not just close
    assert torch.isneginf(out[::5, :300]).all() and torch.isfinite(out[::5, 300:]).all()


def test_masked_tokens_are_the_same_as_absent_tokens():
    # A -inf logit must act as if that token were not in the vocabulary: same update on the remaining tokens.
    z = random_rows(n=8, vocab=400, seed=3).double()  # fp64: see the first test on fp32 rounding under Adam
    masked = z.clone()
    masked[:, 100:250] = -math.inf
    kept = torch.cat([z[:, :100], z[:, 250:]], 1)
    out, ref = minimize_logit_entropy(masked, n_steps=5), minimize_logit_entropy(kept, n_steps=5)
    torch.testing.assert_close(torch.cat([out[:, :100], out[:, 250:]], 1), ref, rtol=0, atol=1e-9)
    assert torch.isneginf(out[:, 100:250]).all()
    # a row with a single finite logit has entropy 0: untouched, no NaN
    one = torch.full((1, 50), -math.inf)
    one[0, 7] = 3.0
    assert torch.equal(minimize_logit_entropy(one), one)


def test_update_never_moves_the_argmax():
    """EM-INF samples after the update: greedy decoding would be plain greedy, because the update only sharpens -- the
    largest logit stays the largest. On rows of every sharpness with masked tokens and near-ties at the top (gaps of
    1e-3..5e-3), in fp32 and bf16, at the released settings and the paper's range (up to 15 steps; threshold 0: every
    row updated; no KL, a strong KL; a larger lr). (Adam rescales each logit by its own history, so far from these
    settings -- 100 steps at lr 1 -- two near-tied top logits can swap.)"""
    for seed in range(2):
        z = random_rows(n=256, vocab=2000, seed=seed)
        z[::4, :500] = -math.inf
        for i in range(0, 256, 3):  # a runner-up just below the top
            j = (z[i].argmax().item() + 7) % 2000
            if z[i, j].isfinite():
                z[i, j] = z[i].max() - 1e-3 * (1 + i % 5)
        for kw in (dict(), dict(threshold=0.0), dict(n_steps=15), dict(n_steps=15, threshold=0.0, kl_weight=0.0),
                   dict(n_steps=15, threshold=0.0, kl_weight=1.0), dict(n_steps=15, lr=0.3, threshold=0.0)):
            for x in (z, z.bfloat16()):
                out = minimize_logit_entropy(x, **kw)
                assert not torch.equal(out, x.float()) and torch.equal(out.argmax(-1), x.float().argmax(-1)), kw


def test_zero_steps_and_zero_lr_return_the_logits():
    z = random_rows(n=6, seed=4)
    assert torch.equal(minimize_logit_entropy(z, n_steps=0), z)
    assert torch.equal(minimize_logit_entropy(z, lr=0.0), z)
    bf16 = z.bfloat16()
    assert torch.equal(minimize_logit_entropy(bf16, n_steps=0), bf16.float())  # fp32 out, values exact


def test_huge_kl_weight_keeps_the_distribution_at_p0():
    # Adam is scale-invariant and the KL gradient is 0 at p0, so the FIRST step is sign(dH/dz) * lr whatever the
    # kl_weight: 3 steps cannot pin p at p0. Run to convergence instead: the optimum of H + 1e6 * KL is p0 itself.
    z = random_rows(n=8, seed=5)
    p0 = z.softmax(-1)
    kw = dict(n_steps=200, lr=0.01, threshold=0.0)
    held = minimize_logit_entropy(z, kl_weight=1e6, **kw).softmax(-1)
    free = minimize_logit_entropy(z, kl_weight=0.0, **kw).softmax(-1)
    assert (0.5 * (held - p0).abs().sum(-1)).max() < 1e-3
    assert (0.5 * (free - p0).abs().sum(-1)).min() > 0.1  # without the KL the same run moves far
    # and with 3 released steps the KL still holds it much closer than without
    tv = [0.5 * (minimize_logit_entropy(z, kl_weight=k).softmax(-1) - p0).abs().sum(-1) for k in (0.0, 1e6)]
    assert (tv[1] < 0.3 * tv[0]).all()


def released_bisection(row, target_ratio, tmin, tmax, tol, max_iter, threshold):
    """The released adaptive temperature for one row, in Python floats (exact entropy)."""
    h0 = token_entropy(row[None]).item()
    target, tau = max(threshold, target_ratio * h0), 1.0
    if h0 > threshold:
        for _ in range(max_iter):
            tau = (tmin + tmax) / 2
            h = token_entropy(row[None] / tau).item()
            if abs(h - target) < tol:
                break
            tmin, tmax = (tau, tmax) if h < target else (tmin, tau)
    return tau


@pytest.mark.parametrize("target_ratio,tol", [(0.85, 0.1), (0.5, 0.01)])
def test_adaptive_temperature_lands_within_tol(target_ratio, tol):
    z = random_rows(n=16, seed=6)
    z[3] = -math.inf
    z[3, 0] = 1.0  # entropy 0 <= threshold: unchanged
    kw = dict(target_ratio=target_ratio, tmin=0.01, tmax=1.0, tol=tol, max_iter=100, threshold=1e-5)
    out = adaptive_temperature(z, **kw)
    h0, h1 = token_entropy(z), token_entropy(out)
    target = (target_ratio * h0).clamp_min(1e-5)
    reachable = token_entropy(z / 0.01) < target  # bisection over [0.01, 1] can reach the target
    assert reachable.sum() >= 12
    assert ((h1 - target).abs() < tol)[reachable & (h0 > 1e-5)].all()
    assert torch.equal(out[3], z[3])
    for i in range(len(z)):
        tau = released_bisection(z[i], **kw)
        torch.testing.assert_close(out[i], z[i] / tau, rtol=1e-5, atol=1e-6)


def tiny_prompts(tokenizer, n=3, length=24):
    """n prompts of exactly `length` tokens (no padding: a hand-written loop needs no attention mask)."""
    texts = ["Find the value of x such that 3x + 5 = 20.", "Compute \\frac{14}{3} + \\dfrac{1}{2}.",
             "The pressure P exerted by wind on a sail varies jointly as the area."][:n]
    ids = [tokenizer(evaluate.build_prompt(tokenizer, t), add_special_tokens=False).input_ids[-length:] for t in texts]
    return torch.tensor(ids)


@torch.no_grad()
def sample_by_hand(model, ids, new, stops, pad, scores_of):
    """A sampling loop with no cache and no transformers machinery: full forward, scores_of(seq, fp32 logits) -> the
    scores to sample from, finished rows get the pad token. Returns (sequences, the scores of each step)."""
    seq, alive, scores = ids.clone(), torch.ones(len(ids), dtype=torch.bool), []
    for _ in range(new):
        s = scores_of(seq, model(seq).logits[:, -1].float())
        scores.append(s)
        tok = torch.where(alive, torch.multinomial(s.softmax(-1), 1)[:, 0], pad)
        seq = torch.cat([seq, tok[:, None]], 1)
        alive &= ~torch.isin(tok, torch.tensor(stops))
        if not alive.any():
            break
    return seq, scores


@pytest.mark.parametrize("proc_temperature,gen_temperature", [(1.2, 1.0), (1.0, 1.2)])
def test_processor_in_generate_equals_hand_written_loop(tiny, proc_temperature, gen_temperature):
    # Sampling at T = 1.2 on the tiny model (adjusted distributions of ~1-5 nats) makes every token depend on the
    # adjusted distribution, so a processor applied in the wrong place, order or row would change the tokens. The second
    # case checks that transformers runs a custom processor before its own temperature warper.
    model, tokenizer = tiny
    ids, new = tiny_prompts(tokenizer), 12
    stops = evaluate.stop_token_ids(tokenizer, model)
    update = functools.partial(minimize_logit_entropy, n_steps=3, threshold=0.3, kl_weight=0.05)
    proc = EMInfProcessor(update, proc_temperature, stops + [tokenizer.pad_token_id])
    # top_k=0, not None: transformers v5 fills a None top_k with the model's or its global default (50)
    config = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=gen_temperature, top_k=0,
                              top_p=None, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(123)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         logits_processor=[proc], return_dict_in_generate=True, output_scores=True)
    # by hand: full forward (no cache), update, divide by 1.2, sample; finished rows get the pad token
    torch.manual_seed(123)
    seq, scores = sample_by_hand(model, ids, new, stops, tokenizer.pad_token_id,
                                 lambda seq, z: minimize_logit_entropy(z) / 1.2)
    assert torch.equal(out.sequences, seq)
    for a, b in zip(out.scores, scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert token_entropy(torch.stack(scores)).mean() > 1.0  # the test samples from a spread distribution


def released_order_scores(seq, z, penalty, temperature, top_k, top_p):
    """The released EM-INF's order, written out: update the raw logits, then generate's processors in transformers'
    order: repetition penalty (over every token of the sequence so far, prompt included), temperature, top-k, top-p."""
    s = minimize_logit_entropy(z)
    for b in range(len(s)):
        seen = seq[b].unique()
        v = s[b, seen]
        s[b, seen] = torch.where(v < 0, v * penalty, v / penalty)
    s = s / temperature
    s = s.masked_fill(s < s.topk(top_k, -1).values[:, -1:], -math.inf)
    srt, idx = s.sort(-1)  # ascending; drop the low tail whose mass is <= 1 - top_p, keep at least the top token
    drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return s.masked_fill(drop.scatter(-1, idx, drop), -math.inf)


def test_penalty_top_k_top_p_in_the_released_order(tiny):
    """With the model-config sampling (Qwen2.5-7B-Instruct's top-k 20 / top-p 0.8 / penalty 1.05, here a stronger
    penalty 1.3 so it shows): generate + EMInfProcessor == update -> penalty -> / T -> top-k -> top-p -> sample by hand.
    transformers runs its own penalty before custom processors; passing it to generate instead would differ."""
    model, tokenizer = tiny
    ids, new, T, k, p, pen = tiny_prompts(tokenizer), 12, 1.3, 20, 0.8, 1.3
    stops = evaluate.stop_token_ids(tokenizer, model)
    update = functools.partial(minimize_logit_entropy, n_steps=3, threshold=0.3, kl_weight=0.05)
    proc = EMInfProcessor(update, T, stops + [tokenizer.pad_token_id], repetition_penalty=pen)
    config = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_k=k, top_p=p,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         logits_processor=[proc])
    torch.manual_seed(5)
    seq, _ = sample_by_hand(model, ids, new, stops, tokenizer.pad_token_id,
                            lambda seq, z: released_order_scores(seq, z, pen, T, k, p))
    assert torch.equal(out, seq)
    # the penalty is not a no-op here: transformers' own (before the update) samples something else
    torch.manual_seed(5)
    theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                            logits_processor=[EMInfProcessor(update, T, stops)], repetition_penalty=pen)
    assert not torch.equal(theirs, seq)


def test_sampling_settings_model_clean_and_overrides(tiny):
    import copy
    import types
    model = copy.copy(tiny[0])
    model.generation_config = GenerationConfig(top_k=20, top_p=0.8, repetition_penalty=1.05, temperature=0.7)
    args = types.SimpleNamespace(sampling_config="model", top_k=None, top_p=None, repetition_penalty=None)
    assert sampling_settings(model, args) == (20, 0.8, 1.05)  # Qwen2.5-7B-Instruct's file, as the release used it
    assert sampling_settings(model, types.SimpleNamespace(**{**vars(args), "sampling_config": "clean"})) == (0, 1, 1)
    override = types.SimpleNamespace(**{**vars(args), "top_k": 0, "top_p": 0.95})
    assert sampling_settings(model, override) == (0, 0.95, 1.05)
    model.generation_config = GenerationConfig()  # nothing set: transformers' defaults, as the release's 4.55 had
    assert sampling_settings(model, args) == (50, 1.0, 1.0)


class ForceStop:
    """Test helper: at call `at`, row 0 may only emit the stop token (a -inf mask, like top-p leaves)."""

    def __init__(self, stop, at):
        self.stop, self.at, self.calls = stop, at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at:
            scores = scores.clone()
            scores[0] = -math.inf
            scores[0, self.stop] = 0.0
        return scores


def test_zero_steps_reproduce_plain_sampling_and_stats_skip_finished_rows(tiny):
    model, tokenizer = tiny
    prompts = [evaluate.build_prompt(tokenizer, p) for p in ("What is 2 + 2?", "Compute 3 * 7.", "Solve x - 1 = 4.")]
    stops = evaluate.stop_token_ids(tokenizer, model) + [tokenizer.pad_token_id]
    run = functools.partial(evaluate.generate_batch, model, tokenizer, prompts, 16, seed=7)
    plain = run(temperature=0.8)  # transformers' own temperature warper
    zero = EMInfProcessor(functools.partial(minimize_logit_entropy, n_steps=0), 0.8, stops)
    assert [o["ids"] for o in run(temperature=1.0, logits_processor=[zero])] == [o["ids"] for o in plain]
    assert zero.sums[0] == zero.sums[1] and zero.sums[2] == zero.sums[3]  # nothing changed
    em = EMInfProcessor(functools.partial(minimize_logit_entropy, n_steps=3), 0.8, stops)
    force = ForceStop(tokenizer.eos_token_id, at=4)
    outs = run(temperature=1.0, logits_processor=[force, em])
    assert [o["ids"] for o in outs] != [o["ids"] for o in plain]  # the update does change what is sampled
    assert len(outs[0]["ids"]) == 4 and outs[0]["ids"][-1] == tokenizer.eos_token_id
    # every generated token (the stop token included) was scored once, padding after a stop never
    assert zero.sums[4] == sum(len(o["ids"]) for o in plain)
    assert em.sums[4] == sum(len(o["ids"]) for o in outs)
    # the four entropy sums, recomputed token by token: an unpadded forward, ForceStop's mask where it acted, then
    # before / after the update, at T = 0.8 and T = 1
    want = torch.zeros(4, dtype=torch.float64)
    for i, (prompt, o) in enumerate(zip(prompts, outs)):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            z = model(torch.tensor([ids + o["ids"]])).logits[0, len(ids) - 1:-1].float()
        if i == 0:  # the 4th generated token of row 0 was forced: only the stop token was left
            z[3] = -math.inf
            z[3, tokenizer.eos_token_id] = 0.0
        after = minimize_logit_entropy(z, n_steps=3)
        want += torch.stack([entropy64(z / 0.8).sum(), entropy64(after / 0.8).sum(), entropy64(z).sum(),
                             entropy64(after).sum()])
    assert em.sums[:4].tolist() == pytest.approx(want.tolist(), rel=1e-4)
    assert em.sums[3] < em.sums[2] - 0.1 * em.sums[4]  # 0.1 nat per token lower after the update (T=1)


def entropy64(z):
    """-(sum p log p) of softmax(z) in float64, 0 log 0 = 0 (a -inf logit is an absent token)."""
    p = torch.softmax(z.double(), -1)
    return -(p * p.log()).nan_to_num().sum(-1)


def test_cli_run_entropies_recomputed(tiny, tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """em_inf.py's main on two benchmarks with --compare-plain. The four entropies per mode and benchmark in
    results.json are recomputed from the tokens it generated (recorded by a wrapper around generate_batch that calls
    the real one): for every generated token, the logits that produced it from an unpadded forward of prompt + the
    tokens before it, entropy before and after the update (minimize_logit_entropy, the defaults), at the sampling
    T = 0.1 and at T = 1, summed / the number of tokens (each once, the stop token included)."""
    import em_inf
    calls, real = [], evaluate.generate_batch

    def recorded(model, tokenizer, prompts, max_new_tokens, *args, logits_processor=None, **kwargs):
        outs = real(model, tokenizer, prompts, max_new_tokens, *args, logits_processor=logits_processor, **kwargs)
        calls.append((logits_processor[0], max_new_tokens, prompts, outs))
        return outs
    monkeypatch.setattr(evaluate, "generate_batch", recorded)
    out = tmp_path / "out"
    em_inf.main(["--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "math500,amc23", "--limit", "3",
                 "--max-new-tokens", "12", "--batch-size", "2", "--compare-plain", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| em-inf | math500 |" in printed and "| plain | amc23 |" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["metrics"]) == {"em-inf", "plain"} and set(res["metrics"]["plain"]) == {"math500", "amc23"}
    assert res["protocol"]["temperature"] == 0.1 and res["protocol"]["template"] == "agarwal"
    # the tiny model's generation_config sets no sampling field: transformers' defaults (the release's protocol)
    assert [res["protocol"][k] for k in ("sampling_config", "top_k", "top_p", "repetition_penalty")] == [
        "model", 50, 1.0, 1.0]
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {x["mode"] for x in lines} == {"em-inf", "plain"}
    # the recorded calls, by processor: a warm-up per mode (4 tokens), then one processor per mode and benchmark
    groups = {}
    for proc, budget, prompts, outs in calls:
        groups.setdefault(proc, []).extend(zip(prompts, outs) if budget == 12 else [])
    runs = [pairs for pairs in groups.values() if pairs]
    assert len(runs) == 4
    model, tok = tiny
    update = functools.partial(minimize_logit_entropy, n_steps=3, lr=0.1, threshold=0.3, kl_weight=0.05)
    for (mode, bench), pairs in zip([(m, b) for m in ("em-inf", "plain") for b in ("math500", "amc23")], runs):
        sums, count = torch.zeros(4, dtype=torch.float64), 0
        for prompt, o in pairs:
            ids = tok(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                z = model(torch.tensor([ids + o["ids"]])).logits[0, len(ids) - 1:-1].float()  # logit t -> token t+1
            after = update(z) if mode == "em-inf" else z
            sums += torch.stack([entropy64(z / 0.1).sum(), entropy64(after / 0.1).sum(), entropy64(z).sum(),
                                 entropy64(after).sum()])
            count += len(o["ids"])
        m = res["metrics"][mode][bench]
        assert m["scored_tokens"] == count == sum(x["length"] for x in lines if x["mode"] == mode and
                                                  x["benchmark"] == bench)
        got = [m[k] for k in ("entropy_before", "entropy_after", "entropy_t1_before", "entropy_t1_after")]
        assert got == pytest.approx((sums / count).tolist(), rel=1e-3), (mode, bench)
        if mode == "em-inf":  # what the update does to these distributions, in numbers
            assert got[3] < got[2] - 0.05
        assert m["problems"] == 3 and 0 <= m["pass@1"] <= 100


def test_torchrun_two_ranks_gather_every_problem_in_order(tiny_model_dir, data_dir, tmp_path):
    """2 ranks each decode every 2nd problem; the gathered samples come back in the benchmark's order, once each, and
    the entropy sums of both ranks add up (scored tokens == generated tokens)."""
    out = tmp_path / "out"
    proc = run_torchrun("em_inf.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "math500",
                        "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2", "--compare-plain",
                        "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    want = [p["id"] for p in evaluate.load_benchmark("math500", data_dir, limit=3)]
    for mode in ("em-inf", "plain"):
        mine = [x for x in lines if x["mode"] == mode]
        assert [x["id"] for x in mine] == want
        m = res["metrics"][mode]["math500"]
        assert m["problems"] == 3 and m["scored_tokens"] == sum(x["length"] for x in mine)


@pytest.mark.parametrize("flags,needle", [
    (["--mode", "greedy"], "--mode"),
    (["--lr", "-0.1"], "--lr"),
    (["--threshold", "-1"], "--threshold"),
    (["--threshold", "7"], "log V"),  # the tiny model's vocabulary is ~500 tokens: log V ~ 6.2
])
def test_cli_bad_flags_one_line(tiny_model_dir, data_dir, flags, needle, tmp_path):
    proc = run_cli("em_inf.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "math500",
                   "--limit", "1", "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(proc, needle)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "error: " in errors[0] and needle in errors[0], proc.stderr  # ours or argparse's

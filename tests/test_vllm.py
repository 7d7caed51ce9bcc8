"""vLLM as the generation engine (evaluate.VLLMModel) against the static one, and as the training scripts' rollout
engine with the trained weights synced in. Skipped where vLLM is not installed (CI's vLLM pass sets
EM_REQUIRE_VLLM=1: there they fail instead). vLLM's CPU attention refuses head_dim 16: these models have 2 heads of 32.
One engine per test module where it can be shared: a start costs ~20 s on 2 cores."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PROMPTS, ROOT, run_cli

import evaluate as ev

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("EM_REQUIRE_VLLM") == "1":
        raise RuntimeError("vLLM is not installed and EM_REQUIRE_VLLM=1")
    pytest.skip("vLLM is not installed (README: generation engines)", allow_module_level=True)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for these models


def build_vllm_tiny(out, tied=True, aim=True):
    """The tests' tiny model and tokenizer with 2 attention heads of 32 (1 KV head); aim: its EOS row of lm_head
    aimed at the mean last hidden state of the prompts, just below the top logit (greedy responses end at varied
    lengths, by margins an update can close: the sync tests leave it random)."""
    from tiny_model import build_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6.0)
        if not tied:  # (the tied model's logits are peaked because its states carry the input embedding)
            model.lm_head.weight.normal_(0.0, 5 * model.model.embed_tokens.weight.std().item())
        tok.padding_side = "left"
        h = None if not aim else model.model(**tok(prompts_of(tok), return_tensors="pt", padding=True)).last_hidden_state[:, -1]
        if aim:
            top, mean = model.lm_head(h).max(-1).values.mean(), h.mean(0)
            model.lm_head.weight[tok.eos_token_id] = mean / mean.norm() * (top - 0.02) / mean.norm()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vdir(tmp_path_factory):
    return build_vllm_tiny(str(tmp_path_factory.mktemp("vtiny") / "m"))


@pytest.fixture(scope="module")
def engine(vdir):
    """The module's engine, fp32, with training's weight sync."""
    return ev.load_vllm(vdir, "float32", 0, extension="training.VLLMWeights")


def prompts_of(tok, n=8):
    return [ev.build_prompt(tok, q, "chat") for q in (PROMPTS * 2)[:n]]


def test_greedy_records_equal_the_static_engines(vdir, engine):
    """fp32, greedy: ids, text and truncated flags equal sample for sample, also cut at stop strings (matched in
    the response only) and at per-row budgets (a protocol's max_total)."""
    model, tok = ev.load_model(vdir, "float32")
    prompts = prompts_of(tok)
    static = ev.generate_batch(model, tok, prompts, 24)
    assert ev.generate_batch(engine, tok, prompts, 24) == static
    assert len({len(o["ids"]) for o in static}) > 2 and any(o["truncated"] for o in static)
    assert not all(o["truncated"] for o in static)
    strings = [static[0]["text"][3:6]]  # a string the first response holds
    cut = ev.generate_batch(model, tok, prompts, 24, stop_strings=strings, budgets=[24, 3, 24, 9, 24, 24, 1, 24])
    assert ev.generate_batch(engine, tok, prompts, 24, stop_strings=strings,
                             budgets=[24, 3, 24, 9, 24, 24, 1, 24]) == cut
    assert cut[0]["text"].endswith(strings[0]) and not cut[0]["truncated"]


def test_sampling_is_seeded_per_row_and_warped(vdir, engine):
    tok = ev.load_tokenizer(vdir)
    prompts = [prompts_of(tok, 1)[0]] * 6
    a = ev.generate_batch(engine, tok, prompts, 12, 1.5, top_k=20, seed=7)
    assert a == ev.generate_batch(engine, tok, prompts, 12, 1.5, top_k=20, seed=7)
    b = ev.generate_batch(engine, tok, prompts, 12, 1.5, top_k=20, seed=8)
    assert a != b and a[1:] != b[:-1]  # nearby seeds share no rows (em_ft's bases are rank + world * step)
    assert len({tuple(o["ids"]) for o in a}) > 1  # row i is seeded from (seed, i): the repeats differ
    assert ev.generate_batch(engine, tok, prompts, 12, 1.5, top_k=1, seed=3) == ev.generate_batch(
        engine, tok, prompts, 12)  # top-k 1 is greedy: the warper is applied
    lp = ev.generate_batch(engine, tok, prompts[:2], 8, 1.0, seed=1, logprobs=True)
    assert all(len(o["logprobs"]) == len(o["ids"]) and max(o["logprobs"]) <= 0 for o in lp)


def test_em_inf_update_per_row_equals_the_hf_path():
    """VLLMLogits on a batch: the rows that asked for the update get em_inf.minimize_logit_entropy of their own
    logits (what the HF path's processor applies, row for row); the other rows are left as they are."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    import em_inf
    kwargs = {"n_steps": 3, "lr": 0.1, "threshold": 0.3, "kl_weight": 0.05}
    spec = ["em_inf:minimize_logit_entropy", kwargs]
    proc = ev.VLLMLogits()
    params = [SamplingParams(extra_args={"em_logits": spec}), SamplingParams(), SamplingParams(
        extra_args={"em_logits": spec})]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                  added=[(i, p, [1, 2], []) for i, p in enumerate(params)]))
    logits = torch.randn(3, 50) * 3
    got = proc.apply(logits.clone())
    for row in (0, 2):
        assert torch.equal(got[row], em_inf.minimize_logit_entropy(logits[row:row + 1], **kwargs)[0])
        hf = em_inf.EMInfProcessor(lambda z: em_inf.minimize_logit_entropy(z, **kwargs), 1.0)
        assert torch.equal(got[row], hf(torch.tensor([[1, 2]]), logits[row:row + 1].clone())[0])
    assert torch.equal(got[1], logits[1])
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[(2, 0, None)]))
    assert proc.rows.keys() == {0}  # row 2 moved to 0, row 0 removed


@pytest.mark.parametrize("tied", [True, False])
def test_weight_sync_after_an_update(tied, tmp_path):
    """After optimizer steps and sync_engine, the engine's greedy continuations equal the updated HF model's and
    differ from the pre-update ones; tied and untied lm_heads both."""
    import training
    path = build_vllm_tiny(str(tmp_path / "m"), tied=tied, aim=False)
    eng = ev.load_vllm(path, "float32", 0, extension="training.VLLMWeights")
    model, tok = ev.load_model(path, "float32")
    prompts = prompts_of(tok, 4)
    before = ev.generate_batch(model, tok, prompts, 16)
    assert ev.generate_batch(eng, tok, prompts, 16) == before
    # a few steps toward one continuation: the updated model prefers it by a margin no kernel rounding crosses
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ids = tok([p + " 5 5 5 5 5 5" for p in prompts], return_tensors="pt", padding=True)
    for _ in range(5):
        model(**ids, labels=ids.input_ids.masked_fill(ids.attention_mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    after = ev.generate_batch(model, tok, prompts, 16)
    assert after != before
    training.sync_engine(eng, model, 1)
    assert ev.generate_batch(eng, tok, prompts, 16) == after
    assert model.config.tie_word_embeddings is tied
    # and number for number: the engine's log-probs of what it samples are the model's (a tied head synced
    # through the embedding alone was 0.8 off here, with the same greedy tokens)
    sampled = ev.generate_batch(eng, tok, prompts, 16, 1.0, seed=0, logprobs=True)
    for p, o in zip(prompts, sampled):
        ids = tok(p, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids + o["ids"]])).logits[0, len(ids) - 1:-1].log_softmax(-1)
        mine = logp.gather(-1, torch.tensor(o["ids"])[:, None])[:, 0]
        assert torch.allclose(mine, torch.tensor(o["logprobs"]), atol=1e-4), (mine, o["logprobs"])


def test_evaluate_cli_with_vllm_writes_the_static_records(vdir, data_dir, tmp_path):
    common = ["evaluate.py", "--model", vdir, "--data-dir", data_dir, "--benchmarks", "gsm8k,kk", "--limit", "3",
              "--max-new-tokens", "16", "--template", "chat", "--dtype", "float32"]
    for engine in ("static", "vllm"):
        proc = run_cli(*common, "--engine", engine, "--out", str(tmp_path / engine))
        assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {e: [json.loads(x) for x in (tmp_path / e / "samples.jsonl").read_text().splitlines()]
               for e in ("static", "vllm")}
    assert samples["vllm"] == samples["static"] and len(samples["vllm"]) == 6
    res = json.loads((tmp_path / "vllm" / "results.json").read_text())["protocol"]
    assert res["engine"] == "vllm" and res["engine_version"] == __import__("vllm").__version__


def test_em_inf_cli_on_vllm(vdir, data_dir, tmp_path):
    proc = run_cli("em_inf.py", "--model", vdir, "--data-dir", data_dir, "--benchmarks", "gsm8k", "--limit", "3",
                   "--max-new-tokens", "8", "--compare-plain", "--engine", "vllm", "--dtype", "float32",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"]["engine"] == "vllm" and set(res["metrics"]) == {"em-inf", "plain"}
    assert res["metrics"]["em-inf"]["gsm8k"]["entropy_before"] is None  # measured on the static engine only
    assert res["metrics"]["em-inf"]["gsm8k"]["samples"] == 3


def test_rollouts_from_vllm_train_what_hf_rollouts_train(vdir, tmp_path):
    """Greedy rollouts (T 0) are the same token ids on both engines in fp32, and the loss is always the trained
    model's: em_ft 2 updates and em_rl 2 steps with --rollout-engine vllm end in the HF run's weights (which also
    shows the sync: step 2 samples from the updated weights)."""
    from safetensors.torch import load_file
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": "5"}) + "\n" for q in PROMPTS[:4]))
    ft = ["em_ft.py", "--model", vdir, "--data", str(data), "--max-steps", "2", "--batch-size", "4",
          "--max-new-tokens", "12", "--temperature", "0", "--lr", "1e-3"]
    rl = ["em_rl.py", "--model", vdir, "--data", str(data), "--steps", "2", "--batch-size", "2", "--n-rollouts",
          "2", "--max-new-tokens", "12", "--temperature", "1", "--lr", "1e-3", "--kl-coef", "0"]
    for script, args in (("ft", ft), ("rl", rl)):
        for engine in ("static", "vllm"):
            proc = run_cli(*args, "--rollout-engine", engine, "--out", str(tmp_path / script / engine))
            assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(tmp_path / "ft" / e / "step_2" / "model.safetensors") for e in ("static", "vllm"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "rl" / "vllm" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["engine_logp_gap"] < 1e-4 for r in log if "loss" in r), log  # fp32: the same numbers


def engine_pids():
    """The pids of vLLM's engine and worker processes on this machine (their names start VLLM::)."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                pids |= {int(pid)} if f.read().startswith("VLLM::") else set()
        except OSError:  # (gone)
            pass
    return pids


def test_two_ranks_each_their_engine(vdir, tmp_path):
    """torchrun, 2 ranks: each rank its own engine on its share (em_ft with vLLM rollouts) trains the weights
    that 2 ranks with HF rollouts train, bit for bit (greedy rollouts: the same ids; the same all-reduce)."""
    from safetensors.torch import load_file
    before = engine_pids()
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"problem": q}) + "\n" for q in PROMPTS[:4]))
    args = ["em_ft.py", "--model", vdir, "--data", str(data), "--max-steps", "2", "--batch-size", "4",
            "--max-new-tokens", "8", "--temperature", "0", "--lr", "1e-3"]
    for engine in ("vllm", "static"):
        proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                       "--rollout-engine", engine, "--out", str(tmp_path / engine), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(tmp_path / n / "step_2" / "model.safetensors") for n in ("static", "vllm"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert engine_pids() <= before  # the ranks' engines stopped with them (os._exit skips atexit)


def test_interrupted_run_leaves_no_engine_process(vdir, tmp_path):
    """Ctrl-C once the engine is up: the run ends with its one line and vLLM's engine and worker processes go
    with it (counted by session: the run is started in a session of its own)."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?"}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "em_ft.py", "--model", vdir, "--data", str(data), "--max-steps",
                             "50", "--batch-size", "2", "--max-new-tokens", "64", "--rollout-engine", "vllm",
                             "--out", str(tmp_path / "out")], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    log = tmp_path / "out" / "log.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().strip()) and proc.poll() is None:
        time.sleep(1)  # the first logged step: the engine is up
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted" in out, out[-3000:]
    time.sleep(8)  # vLLM gives its engine core 5 s to stop
    left = [p for p in os.listdir("/proc") if p.isdigit() and _session(p) == proc.pid]
    assert left == [], left


def _session(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[4])
    except (OSError, ValueError, IndexError):
        return None

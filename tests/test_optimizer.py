"""evaluate.py's training machinery: the fp32-master AdamW against torch's plain fp32 AdamW on the same grads, the
GPU-or-CPU placement arithmetic, and the per-phase timing and memory fields of em_ft.py's and em_rl.py's logs."""
import json

import pytest
import torch

import em_ft
import em_rl
import training


def tiny_like_params(tiny, dtype):
    """Copies of the tiny model's weights (the session model stays untouched), plus a [7, 5] tensor that never gets a
    gradient (AdamW must skip it, as torch's does)."""
    return [q.detach().to(dtype, copy=True).requires_grad_() for q in tiny[0].parameters()] + \
        [torch.randn(7, 5, dtype=dtype).requires_grad_()]


class SyncStream:
    """Stand-in for torch.cuda's Stream/Event on a machine without a GPU: every copy is already done when issued."""
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    wait_stream = synchronize = record = __init__


def master_weights(opt, params):
    """The fp32 master copy of every parameter: the chunks hold all parameters laid end to end."""
    return [m.view(q.shape) for q, m in zip(params, torch.cat(opt.flat).split([q.numel() for q in params]))]


@pytest.mark.parametrize("dtype,staged", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_master_adamw_is_fp32_adamw(tiny, dtype, staged, monkeypatch):
    """3 steps of MasterAdamW (master on the CPU, chunks of 3000 elements: the embedding is cut in 11 pieces, small
    tensors share chunks, pieces straddle chunk boundaries) == torch.optim.AdamW (fp32, for-loop) on fp32 copies of
    the same weights with the same grads and clip_grad_norm_; the model holds the master rounded to its dtype.
    staged: the offloaded-from-GPU path's bookkeeping (two pinned grad buffers used in turn, chunk k+1 fetched
    before chunk k is stepped, one copy back per chunk), with CUDA streams and events replaced by synchronous
    stand-ins; the asynchronous copies themselves only run on a GPU (bench/gpu.sh)."""
    torch.manual_seed(0)
    params = tiny_like_params(tiny, dtype)
    ref = [q.detach().to(torch.float32, copy=True).requires_grad_() for q in params]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = training.MasterAdamW(params, "cpu", chunk=3000, **kw)
    if staged:
        for name in ("Stream", "Event", "stream", "current_stream"):
            monkeypatch.setattr(torch.cuda, name, SyncStream)
        opt.staged, opt.stream, opt.pinned = True, SyncStream(), [torch.full((3000,), float("nan")) for _ in range(2)]
    ref_opt = torch.optim.AdamW(ref, foreach=False, fused=False, **kw)
    assert len(opt.chunks) > 10 and any(len(c) > 1 for c in opt.chunks)  # split tensors and shared chunks
    assert [len(f) for f in opt.flat[:-1]] == [3000] * (len(opt.chunks) - 1)
    for step, clip in enumerate([1e9, 1.0, 1e9]):  # the clip acts at step 2 only (norms here are 3..10)
        for q, r in zip(params[:-1], ref[:-1]):
            q.grad = (torch.randn_like(r) * 0.01 * (step + 1)).to(dtype)
            r.grad = q.grad.to(torch.float32, copy=True)
        norm = opt.step(clip)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        assert (norm > clip) == (step == 1)
        for q, m, r in zip(params, master_weights(opt, params), ref):
            assert q.grad is None
            torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(q.detach(), m.to(dtype))  # the only rounding is fp32 -> model dtype
    assert torch.equal(master_weights(opt, params)[-1], params[-1].detach().float())  # no grad: never moved


def test_plain_placement_is_torch_adamw(tiny):
    """master=None (CPU runs, FSDP2): torch AdamW on the parameters themselves, after clip_grad_norm_."""
    torch.manual_seed(1)
    params = tiny_like_params(tiny, torch.float32)[:-1]
    ref = [q.detach().clone().requires_grad_() for q in params]
    opt, ref_opt = training.MasterAdamW(params, None, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    for q, r in zip(params, ref):
        q.grad = torch.randn_like(q)
        r.grad = q.grad.clone()
    norm = opt.step(0.5)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 0.5))
    ref_opt.step()
    for q, r in zip(params, ref):
        assert q.grad is None
        torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-7)


def test_optimizer_placement_arithmetic(capsys):
    gib = 2**30
    n7b, n05b = 7_615_616_512, 494_032_768  # Qwen2.5-Math-7B (untied lm_head) and Qwen2.5-0.5B (tied)

    def place(n, free):  # a parameter of n elements that costs no memory; "meta" = its device, "kept"
        where = training.master_placement([torch.empty(n, device="meta")], free=int(free))
        return where == "cpu", capsys.readouterr().out
    # H200 (~139.5 GiB usable) minus the bf16 7B model (14.2 GiB): 14 B/param (99.3 GiB) + 10 GiB margin fit
    offload, msg = place(n7b, 125.3 * gib)
    assert not offload and "kept on the GPU" in msg
    assert "85.1 GiB + bf16 grads 14.2 GiB + margin 10 GiB = 109.3 GiB <= 125.3 GiB" in msg, msg
    # H100 80 GB (79.1 GiB) minus the 7B model: offloaded, with the host RAM it takes
    offload, msg = place(n7b, 64.9 * gib)
    assert offload and "109.3 GiB > 64.9 GiB" in msg and "offloaded to the CPU (85.1 GiB of host RAM)" in msg, msg
    # em_rl's 7B on an H200 with the bf16 reference model too (2 x 14.2 GiB): still fits, 1.8 GiB to spare
    assert not place(n7b, 111.1 * gib)[0]
    assert place(n7b, 109.2 * gib)[0]
    assert not place(n05b, 78 * gib)[0]  # 0.5B on an H100: 16.4 GiB
    need = n05b * 14 + 10 * gib  # the boundary: exactly enough is enough
    assert not place(n05b, need)[0] and place(n05b, need - 1)[0]


def test_master_placement_forced_and_cpu():
    params = [torch.zeros(3, dtype=torch.bfloat16)]
    assert training.master_placement(params, True) == "cpu"
    assert training.master_placement(params, None) == "cpu"  # no GPU: nothing to decide
    assert training.master_placement(params, False) == "cpu"  # "the model's device"


def test_phase_timer_adds_up():
    timer = training.PhaseTimer(cuda=False)
    for name in ["rollout", "fwd_bwd", "optimizer", "fwd_bwd"]:
        sum(range(20000))
        timer.mark(name)
    s = timer.seconds()  # structure, not clock values (a phase on a fast machine can read 0)
    assert list(s) == ["rollout_s", "fwd_bwd_s", "optimizer_s", "step_s"] and min(s.values()) >= 0
    assert s["step_s"] == pytest.approx(s["rollout_s"] + s["fwd_bwd_s"] + s["optimizer_s"])
    mem = training.memory_gb(cuda=False)
    assert 0 < mem["host_rss_gb"] < 1024 and 0 < mem["peak_mem_gb"] < 1024  # (ru_maxrss can lag VmRSS)


BREAKDOWN = ["rollout_s", "fwd_bwd_s", "optimizer_s", "step_s", "peak_mem_gb", "host_rss_gb"]


@pytest.mark.parametrize("offload", ["--offload-optimizer", "--no-offload-optimizer"])
def test_logs_carry_the_breakdown(tiny_model_dir, tmp_path, offload, capsys):
    """Each update's log line and log.jsonl: time per phase (the step's phases add up to step_s) and memory."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?"}) + "\n")
    em_ft.main(["--model", tiny_model_dir, "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "6",
                offload, "--out", str(tmp_path / "ft")])
    em_rl.main(["--model", tiny_model_dir, "--data", str(data), "--batch-size", "1", "--max-new-tokens", "6",
                "--steps", "1", "--ppo-minibatches", "2", offload, "--out", str(tmp_path / "rl")])
    for name, extra in (("ft", []), ("rl", ["score_s"])):
        lines = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        log = [x for x in lines if "loss" in x][-1]  # (em_ft logs a checkpoint on a line of its own)
        for key in BREAKDOWN + extra:  # seconds are >= 0 (not > 0: a fast phase can read 0); memory is never 0
            assert isinstance(log[key], float) and log[key] >= 0 and (log[key] > 0 or key.endswith("_s")), (name, key)
        phases = sum(v for k, v in log.items() if k.endswith("_s") and not k.endswith(("tok_s", "step_s")))
        assert log["step_s"] == pytest.approx(phases, rel=1e-6), name
    out = capsys.readouterr().out  # the log lines on stdout carry the same fields
    assert all(out.count(f" {key} ") == 2 for key in BREAKDOWN), out


def test_gpu_script_smoke_on_cpu(tmp_path):
    """bench/gpu.sh at the tiny shape (GPU_SH_SHAPE=tiny): every step runs and records its line in the results file,
    with the benches' RESULT records (the run on a GPU uses the same commands at other sizes). Its correctness
    check records its differences; on the CPU, in fp32, they are what the CPU gives: the "cpu" master's AdamW ==
    torch's to float rounding (the staged GPU path itself runs only on a GPU)."""
    import os
    import subprocess
    import sys
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "GPU_SH_SHAPE": "tiny", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
                               "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in (tmp_path / "gpu_results.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps][:5] == ["env", "check_optimizer", "em_ft_auto", "em_ft_offload", "em_rl"]
    assert {"generate", "em_inf"} <= {s["step"] for s in steps}
    assert all(s["rc"] == 0 for s in steps), [(s["step"], s["tail"]) for s in steps if s["rc"]]
    results = {s["step"]: s["results"] for s in steps}
    (opt,), (gen,) = results["check_optimizer"], results["generate"]
    assert opt["check"] == "optimizer" and opt["device"] == "cpu" and not opt["staged"] and opt["chunks"] > 10
    assert opt["steps"] == 3 and opt["max_update"] > 1e-3  # the weights moved: the difference below means something
    assert opt["max_abs_weight_diff"] < 1e-7 and opt["max_rel_grad_norm_diff"] < 1e-6, opt
    assert opt["model_rounding_mismatches"] == 0 and opt["gradless_untouched"] and opt["ok"]
    norms = [a for a, _ in opt["grad_norms"]]
    assert norms[1] > 1.0  # the clip (1.0 at step 2, 1e9 else) acted
    assert gen["bench"] == "generate" and gen["runs"][0]["engine"] == "static"  # (+ vLLM where installed)
    assert all(r["tokens"] == 8 * 16 for r in gen["runs"]), gen  # every row its full length
    ft = [r for s in steps if s["step"] == "em_ft_offload" for r in s["results"]]
    assert len(ft) == 2 and all(r["master"] == "cpu" and r["optimizer_s"] >= 0 for r in ft)
    assert [r["bench"] for s in steps if s["step"] == "em_rl" for r in s["results"]] == ["em_rl"]
    roll = results["rollouts"]  # em_ft and em_rl end to end (static here; + vLLM on a machine with it)
    assert [r["script"] for r in roll] == ["em_ft", "em_rl"], roll
    assert all(r["runs"][0]["engine"] == "static" and r["runs"][0]["rollout_tok_s"] > 0 for r in roll), roll

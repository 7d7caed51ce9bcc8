"""
Correctness check of the offloaded optimizer step: training.MasterAdamW with its fp32 master and AdamW state in
host RAM beside a bf16 model on the GPU (the staged path: two pinned grad buffers, a side stream, events, one DMA
back per chunk) against torch.optim.AdamW on fp32 copies of the same weights given the same grads, for a few steps
(the clip acts at the second). The grad norms of every step (AdamW is blind to a constant scale of a gradient, so
they are compared on their own); after the last step, every master weight against its fp32 reference (an error at
any step stays in the weights: a chunk stepped with stale grads, a clip missed, a copy back lost), and the model
against the master rounded to bf16 (the only rounding). One line

    RESULT {"check": "optimizer", "max_abs_weight_diff": ..., "max_rel_grad_norm_diff": ..., ...}

and exit 1 when a difference exceeds its tolerance. On a CPU the same code runs the "cpu" master beside a bf16 CPU
model (no streams: the local path), which is what the test suite's smoke run of bench/gpu.sh exercises.

    python bench/check_optimizer.py --shape 1.5b                  # 1 GPU (bench/gpu.sh): 1.5B parameters, ~25 chunks
    python bench/check_optimizer.py --shape tiny --chunk 3000     # CPU, seconds
"""
import argparse, json, math, os, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import training  # noqa: E402
from tiny_model import SHAPES  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES), help="parameter shapes (random values)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (the clip acts at step 2)")
    p.add_argument("--chunk", type=int, default=2**26, help="MasterAdamW's chunk (elements; the scripts' 2^26)")
    p.add_argument("--weight-tol", type=float, default=1e-6, help="largest |master - fp32 reference| accepted")
    p.add_argument("--norm-tol", type=float, default=1e-5, help="largest relative grad-norm difference accepted")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        shapes = [q.shape for q in Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape])).parameters()]
    shapes.append(torch.Size([7, 5]))  # a parameter that never gets a gradient: AdamW must leave it alone
    n = sum(s.numel() for s in shapes)
    torch.manual_seed(0)
    model = [(torch.randn(s, device=device) * 0.02).to(torch.bfloat16).requires_grad_() for s in shapes]
    ref = [q.detach().float().clone().requires_grad_() for q in model]  # fp32 copies on the same device
    start = [r.detach().clone() for r in ref]
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t0 = time.time()
    opt = training.MasterAdamW(model, "cpu", chunk=args.chunk, **kw)
    ref_opt = torch.optim.AdamW(ref, **kw)
    print(f"{device}, shape {args.shape}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters, {len(opt.chunks)} chunks "
          f"of <= {args.chunk} elements, staged (pinned buffers, side stream) {opt.staged}; set-up {time.time() - t0:.1f} s",
          flush=True)
    norms, weight_diff, rounding_off, moved, phases = [], 0.0, 0, 0.0, []
    for step, clip in enumerate([1e9, 1.0] + [1e9] * (args.steps - 2)):
        g = torch.Generator(device).manual_seed(step)
        for q, r, s in zip(model[:-1], ref[:-1], shapes[:-1]):  # grad norm ~ step + 1: the clip at 1.0 acts at step 2
            q.grad = (torch.randn(s, device=device, generator=g) * ((step + 1) / math.sqrt(n))).to(torch.bfloat16)
            r.grad = q.grad.float()
        timer = training.PhaseTimer(device == "cuda")
        norm = opt.step(clip).item()
        timer.mark("optimizer")
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip).item()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        phases.append(timer.seconds())
        norms.append((norm, ref_norm))
        assert all(q.grad is None for q in model), "MasterAdamW leaves no grad behind"
    # every chunk of the master against the same elements of the fp32 reference, and the model against the master
    # rounded to bf16 (one chunk at a time: no second full copy on the host)
    for k, chunk in enumerate(opt.chunks):
        master = opt.flat[k]
        want = torch.cat([ref[i].detach().view(-1)[a:a + m] for i, a, m in chunk]).cpu()
        held = torch.cat([model[i].detach().view(-1)[a:a + m] for i, a, m in chunk]).cpu()
        weight_diff = max(weight_diff, (master - want).abs().max().item())
        rounding_off += (held != master.to(torch.bfloat16)).sum().item()
    for r, s in zip(ref, start):
        moved = max(moved, (r.detach() - s).abs().max().item())
    untouched = torch.equal(opt.flat[-1][-35:], start[-1].view(-1).cpu())  # the last 35 elements: the [7, 5]
    norm_diff = max(abs(a - b) / b for a, b in norms)
    ok = weight_diff <= args.weight_tol and norm_diff <= args.norm_tol and rounding_off == 0 and untouched
    for (a, b), ph in zip(norms, phases):
        print(f"grad norm {a:.7g} (torch {b:.7g}); " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    print(f"max |master - fp32 AdamW| {weight_diff:.3g} (largest update {moved:.3g}), max relative grad-norm "
          f"difference {norm_diff:.3g}, model != bf16(master) in {rounding_off} elements, gradless parameter "
          f"untouched: {untouched} -> {'OK' if ok else 'FAILED'}")
    print("RESULT " + json.dumps({
        "check": "optimizer", "device": device, "shape": args.shape, "params": n, "chunks": len(opt.chunks),
        "staged": opt.staged, "steps": len(norms), "grad_norms": norms, "max_abs_weight_diff": weight_diff,
        "max_rel_grad_norm_diff": norm_diff, "max_update": moved, "model_rounding_mismatches": rounding_off,
        "gradless_untouched": untouched, "step_s": [ph["step_s"] for ph in phases], "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

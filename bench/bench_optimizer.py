"""
Benchmark the CPU side of the offloaded optimizer step (fp32 master weights + AdamW in host RAM for a bf16 model)
on a parameter set of a real shape, default Qwen2.5-0.5B's (494M parameters): seconds per step of

    before   the old em_ft/em_rl offloaded_step: clip, then per group of 16 tensors grads upcast to fp32 CPU copies
             and one foreach AdamW.step over all the master tensors (it skips those without a grad), copy back
    after    training.MasterAdamW(params, "cpu"): chunks of 2^26 elements, grads upcast and scaled by the clip
             coefficient, fused AdamW, master rounded into the model. Here the "GPU" model is a bf16 CPU
             copy, so all three run on the CPU; offloaded from a real GPU, the grads and the copy back run on
             the GPU and as DMA, overlapped, and the CPU's share of the step is AdamW alone.
    adamw    torch.optim.AdamW alone on the fp32 master with fp32 grads: for-loop, foreach, fused implementations

at each --threads value. The first step of each allocates AdamW's state and is not counted.

    python bench/bench_optimizer.py                      # 0.5B shapes, ~10 GB of RAM, a few minutes on 2 cores
    python bench/bench_optimizer.py --shape tiny --steps 2 --threads 1
"""
import argparse, gc, os, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import training  # noqa: E402
from tiny_model import SHAPES  # noqa: E402

SHAPES = {**SHAPES, "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)}


def legacy_offloaded_step(params, master, optimizer, grad_clip):
    """em_ft.py / em_rl.py's offloaded_step before training.MasterAdamW (kept here as the 'before' figure)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for start in range(0, len(params), 16):
        group = range(start, min(start + 16, len(params)))
        for i in group:
            master[i].grad = None if params[i].grad is None else params[i].grad.to("cpu", torch.float32)
            params[i].grad = None
        optimizer.step()
        for i in group:
            master[i].grad = None
            params[i].data.copy_(master[i], non_blocking=True)
    return norm


def timed(step, steps):
    step()  # allocates the AdamW state
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.5b", choices=list(SHAPES), help="parameter shapes (random values)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one untimed)")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="comma list of torch.set_num_threads")
    p.add_argument("--variants", default="before,after,loop,foreach,fused", help="which to time")
    args = p.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        shapes = [q.shape for q in Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape])).parameters()]
    n = sum(s.numel() for s in shapes)
    print(f"shape {args.shape}: {len(shapes)} tensors, {n / 1e6:.1f}M params; fp32 master + AdamW state "
          f"{n * 12 / 2**30:.2f} GiB; torch {torch.__version__}, {os.cpu_count()} CPUs")
    torch.manual_seed(0)
    model = [torch.randn(s, dtype=torch.bfloat16).mul_(0.02).requires_grad_() for s in shapes]  # the "GPU" model
    grads = [torch.randn(s, dtype=torch.bfloat16).mul_(1e-4) for s in shapes]
    kw = dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for variant in args.variants.split(","):
            if variant == "before":
                master = [q.detach().to("cpu", torch.float32, copy=True).requires_grad_() for q in model]
                opt = torch.optim.AdamW(master, foreach=True, **kw)

                def step(opt=opt):
                    for q, g in zip(model, grads):
                        q.grad = g
                    legacy_offloaded_step(model, master, opt, 1.0)
            elif variant == "after":
                opt = training.MasterAdamW(model, "cpu", **kw)

                def step(opt=opt):
                    for q, g in zip(model, grads):
                        q.grad = g
                    opt.step(1.0)
            else:  # AdamW alone on fp32 tensors that own their fp32 grads
                master = [q.detach().to(torch.float32, copy=True).requires_grad_() for q in model]
                for m, g in zip(master, grads):
                    m.grad = g.float()
                impl = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]
                opt = torch.optim.AdamW(master, **impl, **kw)
                step = opt.step
            s = timed(step, args.steps)
            rows.append((threads, variant, s))
            print(f"threads {threads}  {variant:8s} {s:7.3f} s/step  ({n / s / 1e6:6.0f}M params/s; "
                  f"x{7.616e9 / n:.1f} for a 7B: ~{s * 7.616e9 / n:.0f} s)  rss {training.memory_gb(False)['host_rss_gb']:.1f} GiB", flush=True)
            del opt, step
            master = None
            gc.collect()
    for threads in sorted({t for t, _, _ in rows}):
        got = {v: s for t, v, s in rows if t == threads}
        if "before" in got and "after" in got:
            print(f"threads {threads}: after/before {got['after'] / got['before']:.2f} "
                  f"({got['before']:.3f} s -> {got['after']:.3f} s per step)")


if __name__ == "__main__":
    main()

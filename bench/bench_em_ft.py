"""
Benchmark em_ft.py's training step at the One-shot EM recipe (64 rollouts of the wind-pressure prompt, 512 new
tokens, T=0.5 / top-p 0.95 / repetition penalty 1.15, loss temperature 0.5, micro-batch 8) on a random-weight
model: seconds per phase of each update (rollout, fwd_bwd, optimizer = clip + AdamW + master weights back into
the model), rollout and train tokens/s, peak GPU memory and host RSS.
On the tiny shape it also times the released code's rollouts (use_cache=False, 2 prompts per generate call)
against em_ft's KV-cached batched rollouts.

    python bench/bench_em_ft.py --shape tiny                 # CPU, seconds
    python bench/bench_em_ft.py --shape 7b --ref-rollouts 0  # 1 GPU: bf16 model, fp32 AdamW placed as em_ft.py does
    python bench/bench_em_ft.py --shape 7b --ref-rollouts 0 --offload-optimizer --batch-size 16   # the CPU AdamW

Random weights rarely emit EOS, so every rollout runs the full 512 tokens: the worst case for time and memory.
"""
import argparse, json, os, resource, sys, time, types
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import em_ft  # noqa: E402
import training  # noqa: E402
from evaluate import build_prompt, generate_batch  # noqa: E402
from tiny_model import SHAPES, build_tokenizer  # noqa: E402

def peak_gb(cuda):
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (random weights)")
    p.add_argument("--steps", type=int, default=2, help="optimizer updates to time (the first includes warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="rollouts per update (paper: 64)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="rollout length (paper: 512)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--rollout-batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--ref-rollouts", type=int, default=8, help="rollouts to time with the released code's "
                   "generation (use_cache=False, 2 per call); 0 = skip")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="fp32 master + AdamW on the CPU (default on CUDA: on the GPU if they fit, as em_ft.py)")
    p.add_argument("--json", action="store_true", help="also print each update as one line 'RESULT {json}'")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    offload = args.offload_optimizer or cuda  # fp32 master weights (em_ft.py on one GPU; forced on a CPU)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = build_tokenizer()
    shape = dict(SHAPES[args.shape])
    shape.setdefault("vocab_size", len(tokenizer))
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if cuda and offload else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.response_entropy = types.MethodType(em_ft.response_entropy, model)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    params = list(model.parameters())
    opt = training.MasterAdamW(params, training.master_placement(params, args.offload_optimizer) if offload else None, lr=2e-5)
    run = types.SimpleNamespace(max_new_tokens=args.max_new_tokens, temperature=0.5, top_p=0.95,
                                repetition_penalty=1.15, rollout_batch_size=args.rollout_batch_size,
                                micro_batch_size=args.micro_batch_size, loss_temperature=0.5, entropy_chunk=1024,
                                loss_norm="token-mean")
    prompt = build_prompt(tokenizer, em_ft.PI1, "chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    # Random big-vocab weights sample ids the tiny tokenizer cannot decode: keep sampling inside its vocabulary.
    vocab_mask = (lambda ids, scores: scores.masked_fill_(torch.arange(scores.shape[-1], device=scores.device)
                                                          >= len(tokenizer), float("-inf")))
    n_params = sum(q.numel() for q in params)
    print(f"shape {args.shape} ({n_params / 1e6:.2f}M params), device {torch.cuda.get_device_name() if cuda else 'cpu'}"
          f", threads {torch.get_num_threads()}, fp32 master on {opt.flat[0].device if opt.flat else None}, "
          f"dtype {dtype}")
    for step in range(1, args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = training.PhaseTimer(cuda)
        model.eval()
        outs = []
        for i in range(0, args.batch_size, args.rollout_batch_size):
            outs += generate_batch(model, tokenizer, [prompt] * min(args.rollout_batch_size, args.batch_size - i),
                                   run.max_new_tokens, run.temperature, run.top_p, seed=step,
                                   repetition_penalty=run.repetition_penalty, logits_processor=[vocab_mask])
        model.train()
        rows = [(prompt_ids, o["ids"]) for o in outs]
        n_tok = sum(len(o["ids"]) for o in outs)
        timer.mark("rollout")
        em_ft.accumulate_gradients(model, rows, tokenizer.pad_token_id, run, n_tok, len(rows), 1, ctx)
        timer.mark("fwd_bwd")
        opt.step(1.0)
        timer.mark("optimizer")
        sec = timer.seconds()
        seq_tok = n_tok + len(rows) * len(prompt_ids)
        ours, train_s = n_tok / sec["rollout_s"], sec["step_s"] - sec["rollout_s"]
        res = {"bench": "em_ft", "shape": args.shape, "step": step, "batch_size": args.batch_size,
               "master": str(opt.flat[0].device) if opt.flat else None, **sec, "rollout_tokens": n_tok,
               "rollout_tok_s": ours, "train_tok_s": seq_tok / train_s, "peak_gb": peak_gb(cuda),
               "host_rss_gb": training.memory_gb(False)["host_rss_gb"]}
        print(f"step {step}: " + " | ".join(f"{k[:-2]} {v:.2f}s" for k, v in sec.items()) +
              f" || rollouts {n_tok} tok = {ours:.0f} tok/s | train {seq_tok} tok in {train_s:.2f}s = "
              f"{seq_tok / train_s:.0f} tok/s | peak {'GPU' if cuda else 'RSS'} {res['peak_gb']:.2f} GB | "
              f"host RSS {res['host_rss_gb']:.2f} GB", flush=True)
        if args.json:
            print("RESULT " + json.dumps(res), flush=True)
    if args.ref_rollouts:
        # The released loop: generate(use_cache=False) on 2 prompts at a time: every new token re-runs the whole
        # sequence (quadratic), and the batch is tiny (serial).
        from transformers import GenerationConfig
        model.eval()
        enc = tokenizer([prompt] * 2, return_tensors="pt", add_special_tokens=False).to(model.device)
        cfg = GenerationConfig(max_new_tokens=run.max_new_tokens, do_sample=True, temperature=0.5, top_p=0.95,
                               repetition_penalty=1.15, use_cache=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
        t0, ref_tok = time.time(), 0
        with torch.no_grad():
            for i in range(0, args.ref_rollouts, 2):
                out = model.generate(**enc, generation_config=cfg, logits_processor=[vocab_mask])
                ref_tok += (out[:, enc.input_ids.shape[1]:] != tokenizer.pad_token_id).sum().item()
        ref_s = ref_tok / (time.time() - t0)
        print(f"rollouts: em_ft KV-cached batch {args.rollout_batch_size}: {ours:.0f} tok/s | released code "
              f"(use_cache=False, batch 2, {args.ref_rollouts} rollouts): {ref_s:.0f} tok/s | "
              f"speed-up {ours / ref_s:.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark em_rl.py's phases on a random-weight model with real shapes (no download):

    rollout  KV-cached sampling at T=1 of `--batch` sequences (all n of a prompt in one call), fixed length
    score    the no-grad forward that gives old log-probs, entropies and the reward (em_rl.response_stats)
    ref      the same forward on the frozen reference model (for the KL)
    train    forward + backward of the PPO-clip/entropy/KL loss with chunked logits, then the optimizer step
             (CUDA: bf16 model, fp32 master weights + AdamW on the GPU if they fit, else on the CPU, as em_rl.py),
             split into fwd_bwd and optimizer (clip + AdamW + master weights back into the model)

It prints tokens/s per phase, the train/rollout ratio, peak GPU memory and host RSS, and the activation memory
one training micro-batch saves for backward with chunked+checkpointed logits versus full [tokens x vocab] logits.

    python bench/bench_em_rl.py --shape tiny                         # CPU, seconds
    python bench/bench_em_rl.py --model /work/models/smollm2-135m-instruct --batch 8   # a real small model, CPU
    python bench/bench_em_rl.py --shape 7b --batch 64 --new-tokens 1024 --prompt-len 256   # one 80 GB GPU
"""
import argparse, json, os, resource, sys, time
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import em_rl  # noqa: E402
import training  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tiny_model import SHAPES  # noqa: E402

def peak_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB, whole process, monotonic


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def saved_for_backward(fn, params):
    """Bytes of activations autograd keeps for backward while fn() builds the graph (weights excluded)."""
    seen, skip = {}, {q.data_ptr() for q in params}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape")
    p.add_argument("--model", default=None, help="a local model folder instead of a random --shape")
    p.add_argument("--batch", type=int, default=32, help="sequences per rollout batch (prompts x n-rollouts)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="response tokens (fixed: no early stop)")
    p.add_argument("--rollout-batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--logit-chunk", type=int, default=1024, help="positions per chunk of the vocab projection")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
    p.add_argument("--no-compare", action="store_true", help="skip the full-logits activation comparison")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="fp32 master + AdamW on the CPU (default on CUDA: on the GPU if they fit, as em_rl.py)")
    p.add_argument("--train-steps", type=int, default=1, help="train steps; the last is reported (the first "
                   "allocates AdamW's state)")
    p.add_argument("--json", action="store_true", help="also print the figures as one line 'RESULT {json}'")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    ctx = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    torch.manual_seed(0)
    if args.model:
        model, ref = (AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device) for _ in range(2))
        config, args.shape = model.config, os.path.basename(args.model.rstrip("/"))
    else:
        config = Qwen2Config(**SHAPES[args.shape])
        with torch.device(device):
            torch.set_default_dtype(dtype)
            model, ref = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
            torch.set_default_dtype(torch.float32)
    ref.requires_grad_(False)  # the frozen KL reference (bf16 on CUDA)
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and cuda):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [q for q in model.parameters()]
    mixed = cuda or args.offload_optimizer  # fp32 master weights for the bf16 model (em_rl.py on one GPU)
    opt = training.MasterAdamW(params, training.master_placement(params, args.offload_optimizer) if mixed else None, lr=1e-6)
    n_params = sum(q.numel() for q in params)
    print(f"shape {args.shape} ({n_params / 1e6:.1f}M params) on {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"{dtype}, gradient checkpointing {model.is_gradient_checkpointing}, "
          f"batch {args.batch} x ({args.prompt_len} prompt + {args.new_tokens} new) tokens")

    # rollout: one generate call per --rollout-batch-size sequences, fixed length so runs are comparable
    V, P, T = config.vocab_size, args.prompt_len, args.new_tokens
    prompts = torch.randint(1, V - 1, (args.batch, P), device=device)
    # top_k=0: the full distribution, as em_rl.py samples (transformers fills top_k=None with 50)
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T,
                           min_new_tokens=T, eos_token_id=V - 1, pad_token_id=0, use_cache=True)
    model.eval()

    def rollout():
        outs = []
        for i in range(0, args.batch, args.rollout_batch_size):
            x = prompts[i:i + args.rollout_batch_size]
            with torch.no_grad(), ctx:
                outs.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen))
        return torch.cat(outs)[:, P:]
    responses, t_roll = timed(rollout)
    mem_roll = peak_gb()
    batches = [training.pack(list(zip(prompts[i:i + args.micro_batch_size].tolist(),
                                responses[i:i + args.micro_batch_size].tolist())), 0, device)
               for i in range(0, args.batch, args.micro_batch_size)]

    def score(m):
        with torch.no_grad(), ctx:
            return [em_rl.response_stats(m, *b, args.logit_chunk) for b in batches]
    stats, t_score = timed(lambda: score(model))
    _, t_ref = timed(lambda: score(ref))
    mem_score = peak_gb()

    # train: one PPO mini-batch = the whole batch here (em_rl.py makes --ppo-minibatches of them per rollout batch)
    model.train()

    def loss_of(batch, old, chunked=True):
        with ctx:
            if chunked:
                lp, ent, _, row = em_rl.response_stats(model, *batch, args.logit_chunk, True)
            else:  # the naive way: full fp32 logits for every position of the micro-batch
                ids, attn, resp = batch
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                logp = torch.log_softmax(logits.float(), -1)[:, :-1]
                sel = resp[:, 1:]
                lp = logp.gather(-1, ids[:, 1:, None])[..., 0][sel]
                ent, row = -(logp.exp() * logp).sum(-1)[sel], sel.nonzero()[:, 0]
        adv = torch.randn(len(batch[0]), device=device)
        loss = em_rl.policy_loss(lp, old, adv[row], "ppo-clip", 0.2) - 0.001 * ent + 0.001 * em_rl.k3_kl(old, lp)
        return loss.sum() / len(lp)

    def train():
        timer = training.PhaseTimer(cuda)
        for b, (old, _, _, _) in zip(batches, stats):
            loss_of(b, old).backward()
        timer.mark("fwd_bwd")
        opt.step(1.0)
        timer.mark("optimizer")
        return timer.seconds()
    for _ in range(args.train_steps):
        phases, t_train = timed(train)
    mem_train = peak_gb()

    seq_tokens, new_tokens = args.batch * (P + T), args.batch * T
    print(f"rollout  {new_tokens / t_roll:10.0f} new tok/s   {t_roll:7.2f} s   peak {mem_roll:.2f} GB")
    print(f"score    {seq_tokens / t_score:10.0f} tok/s       {t_score:7.2f} s   peak {mem_score:.2f} GB")
    print(f"ref      {seq_tokens / t_ref:10.0f} tok/s       {t_ref:7.2f} s")
    print(f"train    {seq_tokens / t_train:10.0f} tok/s       {t_train:7.2f} s   peak {mem_train:.2f} GB "
          f"(fwd+bwd+optimizer step; host RSS {training.memory_gb(False)['host_rss_gb']:.2f} GB; fp32 master on "
          f"{opt.flat[0].device if opt.flat else None}): " +
          ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in phases.items()))
    total = t_roll + t_score + t_ref + t_train
    print(f"step     {total:.2f} s: rollout {t_roll / total:.0%}, score+ref {(t_score + t_ref) / total:.0%}, "
          f"train {t_train / total:.0%}; train/rollout tok/s ratio "
          f"{(seq_tokens / t_train) / (new_tokens / t_roll):.1f}")
    if args.json:
        print("RESULT " + json.dumps({"bench": "em_rl", "shape": args.shape, "batch": args.batch, "prompt_len": P,
                                      "new_tokens": T, "rollout_s": t_roll, "score_s": t_score, "ref_s": t_ref,
                                      "train_s": t_train, **phases, "peak_gb": mem_train,
                                      "host_rss_gb": training.memory_gb(False)["host_rss_gb"],
                                      "master": str(opt.flat[0].device) if opt.flat else None}), flush=True)
    if not args.no_compare:
        b, old = batches[0], stats[0][0]
        (_, chunked), (_, full) = (saved_for_backward(lambda c=c: loss_of(b, old, c), params) for c in (True, False))
        model.zero_grad(set_to_none=True)
        print(f"saved for backward, one micro-batch of {args.micro_batch_size}: chunked logits "
              f"{chunked / 2**20:.1f} MB, full logits {full / 2**20:.1f} MB (ratio {full / max(chunked, 1):.1f}x)")


if __name__ == "__main__":
    main()

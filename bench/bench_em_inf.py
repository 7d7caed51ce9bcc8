"""Speed of EM-INF and adaptive-temperature decoding vs plain sampling, same batch, same code path (em_inf.py).

Decodes a fixed number of tokens (no stop token, so every mode generates exactly batch x new-tokens) with a
random-weight model of a real shape, or any local model, and prints tokens/s, the ratio to plain sampling, and
peak memory. Also times the logit update alone on a [batch, vocab] tensor against the lm_head matmul that
produced it (the update is O(vocab) per row per step; it must stay small next to a forward pass).

    python bench/bench_em_inf.py --shape tiny                       # CPU, seconds
    python bench/bench_em_inf.py --shape 1.5b --update-only         # CPU: update vs lm_head at vocab 151936
    python bench/bench_em_inf.py --model /work/models/smollm2-135m-instruct --batch-size 8 --new-tokens 64
    python bench/bench_em_inf.py --shape 7b --batch-size 64 --new-tokens 256 [--compile]   # 1 GPU, bf16

Random weights give near-uniform next-token distributions (entropy ~ log V): every row is above the threshold,
which is the worst case for adaptive temperature (its bisection runs until each row converges) and the same
cost as any case for EM-INF (its steps always run; finished rows are masked, not skipped).
"""
import argparse, os, resource, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from em_inf import EMInfProcessor, adaptive_temperature, minimize_logit_entropy  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tiny_model import SHAPES  # noqa: E402

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    config = Qwen2Config(**SHAPES[args.shape], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.set_default_dtype(dtype)
    with torch.device(device):  # init straight on the GPU: a 7B fp32 init on the CPU takes minutes
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def time_update(args, device, dtype):
    """The update alone on [B, V] fp32 logits vs the lm_head matmul [B, hidden] x [hidden, V] that makes them."""
    shape = SHAPES[args.shape]
    head = torch.nn.Linear(shape["hidden_size"], shape["vocab_size"], bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(head.weight, std=0.02)
    h = torch.randn(args.batch_size, shape["hidden_size"], device=device, dtype=dtype)
    logits = torch.randn(args.batch_size, shape["vocab_size"], device=device) * 3  # entropies well above 0.3
    update = torch.compile(minimize_logit_entropy, dynamic=True) if args.compile else minimize_logit_entropy
    fns = {"lm_head": lambda: head(h), "em-inf update (3 steps)": lambda: update(logits),
           "adaptive temperature": lambda: adaptive_temperature(logits)}
    res = {}
    for name, fn in fns.items():
        with torch.no_grad():
            for _ in range(2):
                fn()
            sync(device)
            t0, reps = time.perf_counter(), 5 if device == "cpu" else 50
            for _ in range(reps):
                fn()
            sync(device)
        res[name] = (time.perf_counter() - t0) / reps * 1e3
        print(f"{name:>26}: {res[name]:8.3f} ms  ({res[name] / res['lm_head']:.2f}x lm_head)  "
              f"[{args.batch_size} x {shape['vocab_size']}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES), help="random-weight model shape")
    parser.add_argument("--model", default=None, help="a local model folder instead of a random shape")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence (no early stop)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (best is reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the EM-INF update")
    parser.add_argument("--update-only", action="store_true", help="only time the update against the lm_head")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} ({torch.get_num_threads()} "
          f"threads), torch {torch.__version__}, shape {args.model or args.shape}, batch {args.batch_size}")
    if args.update_only:
        return time_update(args, device, dtype)
    from transformers import GenerationConfig
    model = build_model(args, device, dtype)
    vocab = model.get_output_embeddings().out_features
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.prompt_len), generator=g).to(device)
    # Every sequence decodes exactly new-tokens: no eos; top_k=0 so transformers adds no top-k warper of its own.
    config = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                  top_p=1.0, eos_token_id=None, pad_token_id=0, use_cache=True)
    update = torch.compile(minimize_logit_entropy, dynamic=True) if args.compile else minimize_logit_entropy
    # mode -> (adjust, sampling temperature, through EMInfProcessor?): "bare" is generate's own temperature warper
    # (no processor, no entropy stats); the others are em_inf.py's code path, each at its released temperature.
    modes = {"bare": (None, 0.1, False), "plain": (None, 0.1, True), "em-inf": (update, 0.1, True),
             "adaptive-temp": (adaptive_temperature, 1.0, True)}
    best = {m: float("inf") for m in modes}
    for r in range(args.repeats + 1):  # round 0 warms up (and compiles); modes interleave against drift
        for mode, (adjust, temperature, wrap) in modes.items():
            procs = [EMInfProcessor(adjust, temperature, stop_ids=[])] if wrap else []
            gen = GenerationConfig(**config, temperature=1.0 if wrap else temperature)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                     logits_processor=procs)
            sync(device)
            assert out.shape[1] == args.prompt_len + args.new_tokens
            if r > 0:
                best[mode] = min(best[mode], time.perf_counter() - t0)
    tokens = args.batch_size * args.new_tokens
    for mode, t in best.items():
        print(f"{mode:>14}: {tokens / t:10.1f} tokens/s  ({best['plain'] / t:.3f}x plain, {best['bare'] / t:.3f}x bare)"
              f"  {t:.2f} s")
    print(f"peak memory: {peak_memory_gb(device):.2f} GB ({'cuda max allocated' if device == 'cuda' else 'max rss'})")


if __name__ == "__main__":
    main()

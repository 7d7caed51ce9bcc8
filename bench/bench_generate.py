"""
Benchmark evaluate.py's generation path (evaluate_model: prompt building, length-sorted KV-cached batches, greedy
decoding, answer extraction and grading) on a random-weight model of a real shape: generated tokens/s, wall time,
peak memory. The problems are synthetic (the device machine has no benchmark files); the vocabulary is masked to
the test tokenizer's ids, which random weights rarely end with EOS: most responses run the whole budget.

    python bench/bench_generate.py --shape tiny                        # CPU, seconds
    python bench/bench_generate.py --shape 7b --problems 128 --batch-size 64 --max-new-tokens 256
    python bench/bench_generate.py --shape 7b --engine continuous      # if evaluate_model takes engine=
"""
import argparse, inspect, json, os, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import evaluate as ev  # noqa: E402
from tiny_model import SHAPES, build_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (random weights)")
    p.add_argument("--problems", type=int, default=32, help="synthetic problems, one greedy response each")
    p.add_argument("--batch-size", type=int, default=16, help="evaluate_model's batch size")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response budget")
    p.add_argument("--engine", default=None, help="passed to evaluate_model(engine=...) when it takes one")
    p.add_argument("--json", action="store_true", help="also print the figures as one line 'RESULT {json}'")
    args = p.parse_args()
    takes_engine = "engine" in inspect.signature(ev.evaluate_model).parameters
    if args.engine not in (None, "static") and not takes_engine:
        sys.exit(f"error: evaluate_model has no engine parameter (--engine {args.engine})")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer()
    config = Qwen2Config(**SHAPES[args.shape], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    with torch.device("cuda" if cuda else "cpu"):  # init straight on the GPU: a 7B init on the CPU takes minutes
        model = Qwen2ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    vocab_mask = (lambda ids, scores: scores.masked_fill_(torch.arange(scores.shape[-1], device=scores.device)
                                                          >= len(tokenizer), float("-inf")))
    problems = [{"id": i, "problem": f"Compute {i} + {3 * i + 1} and then multiply the sum by {i % 7 + 2}.",
                 "answer": str((4 * i + 1) * (i % 7 + 2))} for i in range(args.problems)]
    extra = {"engine": args.engine} if args.engine and takes_engine else {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics, samples = ev.evaluate_model(model, tokenizer, problems, "qwen-math", args.max_new_tokens,
                                         batch_size=args.batch_size, logits_processor=[vocab_mask], progress=False,
                                         **extra)
    wall = time.perf_counter() - t0
    tokens = sum(s["length"] for s in samples)
    res = {"bench": "generate", "shape": args.shape, "engine": args.engine or "default", "problems": args.problems,
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "tokens": tokens, "wall_s": wall,
           "tok_s": tokens / wall, "truncated": sum(s["truncated"] for s in samples) / len(samples),
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else ev.host_rss_gb()}
    print(f"shape {args.shape}, engine {res['engine']}: {args.problems} problems, batch {args.batch_size}, "
          f"<= {args.max_new_tokens} new tokens: {tokens} tokens in {wall:.2f} s = {res['tok_s']:.0f} tok/s "
          f"(first call: includes warm-up), truncated {res['truncated']:.0%}, peak {res['peak_gb']:.2f} GB")
    if args.json:
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

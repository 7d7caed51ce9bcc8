"""
Correctness check of continuous batching: evaluate.generate_batch(engine="continuous") against engine="static",
greedy, in fp32 (where the packed and the padded batch must pick the same tokens), on the same prompts in the same
batches, random weights of --shape. One line

    RESULT {"check": "generate", "rows": ..., "differing_rows": ..., "first_diff": ..., ...}

(first_diff: the earliest position at which a row differs, null when none; for the first differing rows, the gap
between the static path's top two logits there, so a near-tie shows as one), and exit 1 when a row differs.

    python bench/check_generate.py --shape 1.5b                                      # 1 GPU (bench/gpu.sh)
    python bench/check_generate.py --shape tiny --n-prompts 6 --batch-size 3 --max-new-tokens 12   # CPU, seconds
"""
import argparse, json, os, sys, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import evaluate as ev  # noqa: E402
from tiny_model import SHAPES, build_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.5b", choices=list(SHAPES), help="random-weight shape (tests/tiny_model.py)")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts (lengths vary)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (both engines)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per row")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = build_tokenizer()
    config = Qwen2Config(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tok))},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # fp32 (the default dtype), initialized where it runs
        model = Qwen2ForCausalLM(config).eval()
    if args.shape == "tiny":  # peaked distributions, as the test model's (tests/tiny_model.py)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(6.0)
    prompts = [ev.build_prompt(tok, f"Compute {i} + {3 * i + 1}, then " + "multiply it by 2, " * (i % 7) +
                               "and report it.") for i in range(args.n_prompts)]
    outs, wall = {}, {}
    for engine in ("static", "continuous"):
        ev.generate_batch(model, tok, prompts[:2], 2, engine=engine)  # warm-up
        t0, outs[engine] = time.time(), []
        for b in range(0, len(prompts), args.batch_size):
            outs[engine] += ev.generate_batch(model, tok, prompts[b:b + args.batch_size], args.max_new_tokens,
                                              engine=engine)
        if device == "cuda":
            torch.cuda.synchronize()
        wall[engine] = time.time() - t0
    static, cont = outs["static"], outs["continuous"]
    diff = [i for i, (x, y) in enumerate(zip(static, cont)) if x["ids"] != y["ids"] or x["truncated"] != y["truncated"]]
    first = {i: next((j for j, (a, b) in enumerate(zip(static[i]["ids"], cont[i]["ids"])) if a != b),
                     min(len(static[i]["ids"]), len(cont[i]["ids"]))) for i in diff}
    gaps = []
    for i in diff[:8]:  # the static path's top-two logit gap where the row first differs
        ids = tok(prompts[i], add_special_tokens=False).input_ids + static[i]["ids"][:first[i]]
        with torch.no_grad():
            top = model(torch.tensor([ids], device=device)).logits[0, -1].float().topk(2).values.tolist()
        gaps.append(top[0] - top[1])
    for e in ("static", "continuous"):
        print(f"{e:10s} {wall[e]:7.1f} s, {sum(len(o['ids']) for o in outs[e])} new tokens")
    print(f"{device}, shape {args.shape}, fp32, greedy: {len(diff)} of {len(prompts)} rows differ" +
          (f", first at position {min(first.values())} (top-2 logit gaps there: {gaps})" if diff else ""))
    print("RESULT " + json.dumps({
        "check": "generate", "device": device, "shape": args.shape, "dtype": "float32", "rows": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "tokens": sum(len(o["ids"]) for o in static), "differing_rows": len(diff),
        "first_diff": min(first.values()) if diff else None, "first_diff_by_row": {str(i): first[i] for i in diff},
        "top2_gap_at_first_diff": gaps, "static_s": wall["static"], "continuous_s": wall["continuous"],
        "ok": not diff}))
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()

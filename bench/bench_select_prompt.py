"""Speed and memory of select_prompt.py's two costs: batched sampling (tokens/s by --batch-size) and the extra
no-grad forward of --score entropy (its time relative to sampling), plus peak memory.

    python bench/bench_select_prompt.py --shape tiny                       # CPU, seconds
    python bench/bench_select_prompt.py --model /work/models/smollm2-135m-instruct --max-new-tokens 128
    python bench/bench_select_prompt.py --shape 7b --batch-sizes 16,64,128   # 1 GPU, Qwen2.5-Math-7B shapes

--shape 1.5b/7b builds a random-weight Qwen2 with Qwen2.5-Math's exact shapes (no download) and the tiny test
tokenizer (its ids are a subset of the vocabulary). Random weights rarely emit a stop token, so every response
runs to --max-new-tokens: a worst case for length, the right case for tokens/s.
"""
import argparse, os, resource, sys, tempfile, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from evaluate import build_prompt, generate_batch, length_sorted_batches, load_benchmark, load_model  # noqa: E402
from select_prompt import strip_suffix, token_entropy  # noqa: E402
from tiny_model import SHAPES  # noqa: E402

def build(args):
    from tiny_model import build_tiny_model, build_tokenizer
    if args.model:
        return load_model(args.model)
    if args.shape == "tiny":
        return load_model(build_tiny_model(tempfile.mkdtemp()))
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cuda = torch.cuda.is_available()
    config = Qwen2Config(**SHAPES[args.shape])
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    tokenizer = build_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def peak_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "1.5b", "7b"], help="random-weight model shape")
    p.add_argument("--model", default=None, help="a real model folder instead of --shape")
    p.add_argument("--data", default=os.path.join(os.environ.get("EM_DATA_DIR", os.path.join(ROOT, "tests", "data")),
                                                  "dsr_sub.parquet"),
                   help="candidate pool (default: $EM_DATA_DIR's DeepScaleR subset, else its excerpt in tests/data; "
                   "synthetic problems if the file is missing)")
    p.add_argument("--candidates", type=int, default=4, help="candidates sampled")
    p.add_argument("--k", type=int, default=16, help="samples per candidate")
    p.add_argument("--max-new-tokens", type=int, default=256, help="budget per response")
    p.add_argument("--batch-sizes", default="16,64", help="comma list of --batch-size values to time")
    p.add_argument("--passes", type=int, default=2, help="passes per batch size (on CUDA the first generate call "
                   "at a new length is much slower per step than later ones)")
    args = p.parse_args()
    model, tokenizer = build(args)
    if os.path.isfile(args.data):
        problems = [strip_suffix(c["problem"]) for c in load_benchmark(args.data, limit=args.candidates)]
    else:
        problems = [f"Find the value of x such that {i}x + 5 = {20 + i}." for i in range(args.candidates)]
    prompts = [build_prompt(tokenizer, q, "chat") for q in problems for _ in range(args.k)]
    pids = [tokenizer(q, add_special_tokens=False).input_ids for q in prompts]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}; model {args.model or args.shape}; {len(prompts)} sequences, "
          f"{args.max_new_tokens} new tokens max")
    base = None
    for bs in [int(b) for b in args.batch_sizes.split(",") for _ in range(args.passes)]:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t_gen = t_ent = tokens = 0
        for b, batch in enumerate(length_sorted_batches([len(x) for x in pids], bs)):
            sync(), (t0 := time.time())
            outs = generate_batch(model, tokenizer, [prompts[i] for i in batch], args.max_new_tokens, 0.6, 1.0,
                                  seed=b)
            sync(), (t1 := time.time())
            token_entropy(model, [pids[i] for i in batch], [o["ids"] for o in outs])
            sync()
            t_gen, t_ent = t_gen + t1 - t0, t_ent + time.time() - t1
            tokens += sum(len(o["ids"]) for o in outs)
        base = base or tokens / t_gen  # the first pass of the first batch size
        print(f"batch {bs:4d}: sampling {tokens / t_gen:8.0f} tok/s ({tokens / t_gen / base:.2f}x the first pass), "
              f"{t_gen:.1f}s; entropy forward {t_ent:.2f}s = {t_ent / t_gen:.3f}x sampling; "
              f"peak memory {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()

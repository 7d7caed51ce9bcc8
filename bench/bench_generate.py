"""Generation speed: the static engine (HF generate, one left-padded KV-cached batch) vs vLLM, on the same
prompts, greedy, every row exactly --max-new-tokens long (EOS ignored: random weights would stop anywhere), in
--dtype (auto: bf16 on CUDA and on CPUs with native bf16). Prints per engine the start-up (apart), wall time,
tokens/s and peak memory, the vllm/static ratio, and how many greedy rows agree (fp32: all should; bf16 kernels
round differently). A RESULT line per run for bench/gpu.sh.

    python bench/bench_generate.py --shape 0.5b --n-prompts 16 --max-new-tokens 128    # CPU: Qwen2.5-0.5B's shape
    python bench/bench_generate.py --model /path/to/model --n-prompts 16                # a real model
    python bench/bench_generate.py --shape 7b --n-prompts 128 --max-new-tokens 512     # 1 GPU
Random weights are saved to a temporary folder first (vLLM loads models from disk). Needs vLLM (README).
"""
import argparse, importlib.util, json, os, sys, tempfile, threading, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import evaluate as ev  # noqa: E402
from tiny_model import SHAPES, build_tokenizer  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process and its children (vLLM's engine runs in its own) while the block
    runs, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self.run = 0.0, True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.run:
            pids = [os.getpid()] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == os.getpid()]
            pids += [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) in pids[1:]]
            total = 0
            for pid in set(pids):
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except OSError:
                    pass
            self.peak = max(self.peak, total / 2**30)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.run = False
        self.thread.join()


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.5b", choices=list(SHAPES), help="random-weight shape (tests/tiny_model.py)")
    p.add_argument("--model", help="a model folder instead of random weights")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (random ids)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--engines", default="static,vllm", help="comma list")
    p.add_argument("--json", action="store_true", help="RESULT lines only")
    args = p.parse_args()
    dtype = ev.resolve_dtype(args.dtype)[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = args.model
    if folder is None:  # random weights of the shape, on disk
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tok = build_tokenizer()
        config = Qwen2Config(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tok))},
                             bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        folder = tempfile.mkdtemp(prefix="bench_generate_")
        Qwen2ForCausalLM(config).to(dtype).save_pretrained(folder)
        tok.save_pretrained(folder)
    tok = ev.load_tokenizer(folder)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, min(len(tok), 30000), (args.n_prompts, args.prompt_len), generator=g).tolist()
    rows, runs = {}, []
    engines = args.engines.split(",")
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print(f"vLLM is not installed: the static engine only ({ev.VLLM_HINT})")
        engines.remove("vllm")
    for engine in engines:
        t0 = time.time()
        with PeakRSS() as mem:
            if engine == "static":
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
                start = time.time() - t0
                x = torch.tensor(prompts, device=device)
                t1 = time.time()
                with torch.no_grad():
                    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                         max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                         pad_token_id=tok.pad_token_id)
                rows[engine] = out[:, x.shape[1]:].tolist()
            else:
                from vllm import SamplingParams
                model = ev.load_vllm(folder, str(dtype).split(".")[1])
                start = time.time() - t0
                params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
                t1 = time.time()
                outs = model.llm.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=False)
                rows[engine] = [list(o.outputs[0].token_ids) for o in outs]
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.time() - t1
        tokens = sum(map(len, rows[engine]))
        runs.append({"engine": engine, "startup_s": round(start, 1), "wall_s": round(wall, 2), "tokens": tokens,
                     "tok_s": round(tokens / wall, 1), "peak_rss_gb": round(mem.peak, 2),
                     "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
        del model
    same = sum(a == b for a, b in zip(*rows.values())) if len(rows) == 2 else None
    result = {"bench": "generate", "shape": args.model or args.shape, "dtype": str(dtype), "device": device,
              "n_prompts": args.n_prompts, "max_new_tokens": args.max_new_tokens, "runs": runs,
              "ratio": runs[-1]["tok_s"] / runs[0]["tok_s"] if len(runs) == 2 else None, "rows_equal": same}
    if not args.json:
        for r in runs:
            print(f"{r['engine']:>7}: start-up {r['startup_s']} s (apart), {r['tokens']} tokens in {r['wall_s']} s = "
                  f"{r['tok_s']} tok/s, peak RSS {r['peak_rss_gb']} GB")
        if len(runs) == 2:
            print(f"{runs[1]['engine']}/{runs[0]['engine']}: {result['ratio']:.2f}x; greedy rows equal: "
                  f"{same}/{args.n_prompts}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

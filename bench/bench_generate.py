"""Static vs continuous batching (evaluate.generate_batch, engine="static" / "continuous") on identical prompts.

Runs the same prompts in the same batches (one generate call per --batch-size prompts, as evaluate_model and the
method scripts call it) through both engines, asserts identical greedy outputs (ids, text, truncated) in fp32 (in
bf16 it counts the rows that differ: the two batch layouts round differently), and prints
per engine: wall time, new tokens, tokens/s, peak memory, plus the continuous/static ratio and the share of the
static path's decode work spent on rows that had already stopped (or were padding).

    # CPU, real small model, GSM8K length mix (prompts and stops of a real model)
    python bench/bench_generate.py --model /work/models/smollm2-135m --benchmark gsm8k --n-prompts 32 \\
        --batch-size 32 --max-new-tokens 256
    python bench/bench_generate.py --shape tiny --n-prompts 24 --max-new-tokens 48        # CPU, seconds
    # 1 GPU, random weights at 7B shapes, bf16: response lengths drawn from --length-mix (random weights never stop),
    # continuous batching with and without CUDA graphs
    python bench/bench_generate.py --shape 7b --n-prompts 256 --batch-size 64 --max-new-tokens 1024 \\
        --length-mix 64:1024 --cuda-graph both

Measured (CPU, 2 cores, fp32, SmolLM2-135M-Instruct, GSM8K test prompts 57-141 tokens, greedy, transformers 5.24;
greedy outputs identical in every run):
    idle machine, 32 prompts, batch 32, 256 new tokens: static 139.3 tok/s, continuous 85.1 tok/s (0.61x wall,
        0.71x in CPU time); 19.8% of static's decode row-steps on stopped rows; peak RSS 1.57 / 1.70 GB
    same, 16 prompts (scripted run, transformers' manager at 16/8/4 concurrent rows): static 29.5 s, continuous
        58.1 / 93.0 / 129.1 s
    machine loaded by ~6 other jobs (load 6 on 2 cores), 32 prompts, batch 16, 256 tokens: static 7.0 tok/s,
        continuous 35.7 tok/s (5.1x wall, 3.8x CPU time); 16 prompts, 512 tokens (46.6% on stopped rows): 16.4 vs
        65.2 tok/s (4.0x wall, 2.6x CPU time) -- the static path's CPU time grew 5x under load, continuous batching's
        did not
    tiny random model (2 layers, 64 wide), 24 prompts, 48 tokens: continuous 0.3x static (per-step overhead)
So on the CPU, auto stays static. GPU: not measured yet (the --shape 7b commands above).

Random weights (--shape) rarely emit a stop token, so each row gets a new-token budget drawn uniformly from
--length-mix: the static path still runs each batch until its longest row ends (its rows are cut afterwards, as a
stop token would), the continuous path ends each row at its budget -- the same work a model stopping at those
lengths causes. Greedy outputs are compared on the kept tokens.
"""
import argparse, json, os, random, sys, threading, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import evaluate as ev  # noqa: E402
from tiny_model import SHAPES, build_tokenizer  # noqa: E402


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def build(args, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    dtype = ev.resolve_dtype(args.dtype)[0]  # auto as evaluate.py picks it: bf16 on CUDA and native-bf16 CPUs
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        return model.eval(), tok
    tok = build_tokenizer()
    config = Qwen2Config(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tok))},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):  # init straight on the GPU: a 7B fp32 init on the CPU takes minutes
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval(), tok


class PeakRSS:
    """Peak resident memory of the process while the block runs (a sampling thread, every 5 ms)."""

    def __enter__(self):
        self.peak, self.on = rss_gb(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.on:
            self.peak = max(self.peak, rss_gb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.on = False
        self.thread.join()


def run_batch(engine, model, tok, batch, lim, args, device):
    """One generate call of one engine; returns (outputs, wall s, CPU s of the process, peak memory GB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu0, t0 = time.process_time(), time.time()
    with PeakRSS() as mem:
        if engine == "static":  # static: runs to the batch's longest budget, cut after
            res = ev.generate_batch(model, tok, batch, max(lim) if lim else args.max_new_tokens, engine="static")
            if lim:
                res = [{**r, "ids": r["ids"][:k], "truncated": r["truncated"] or len(r["ids"]) > k}
                       for r, k in zip(res, lim)]
        else:  # what generate_batch does on the continuous path, plus per-row budgets and the CUDA-graph choice
            from transformers import GenerationConfig
            stops = ev.stop_token_ids(tok, model)
            config = GenerationConfig(max_new_tokens=max(lim) if lim else args.max_new_tokens, do_sample=False,
                                      eos_token_id=stops, pad_token_id=tok.pad_token_id)
            assert ev.pick_engine(model, config, engine="continuous") == "continuous"
            graph = {"continuous+graphs": True, "continuous-graphs": False}.get(engine)
            rows = ev.continuous_generate(model, [tok(p, add_special_tokens=False).input_ids for p in batch],
                                          config, cuda_graph=graph, limits=lim)
            res = []
            for r, k in zip(rows, lim or [None] * len(rows)):
                o = ev.cut_at_stop(r, stops, tok)
                res.append({**o, "truncated": o["truncated"] or (k is not None and len(r) >= k)})
        if device == "cuda":
            torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else mem.peak
    return res, time.time() - t0, time.process_time() - cpu0, peak


def static_waste(prompts, outs, tok, batch_size):
    """Share of the static path's decode row-steps spent on rows already stopped: per batch, B x (longest new
    length) row-steps are computed, sum(new lengths) of them are kept."""
    computed = kept = 0
    for b in range(0, len(outs), batch_size):
        lens = [len(o["ids"]) for o in outs[b:b + batch_size]]
        computed, kept = computed + len(lens) * max(lens), kept + sum(lens)
    return 1 - kept / max(computed, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF model folder (else random weights of --shape)")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="random-weight shape (tests/tiny_model.py)")
    p.add_argument("--benchmark", default="gsm8k", help="prompts: problems of this benchmark (qwen-math prompt)")
    p.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR", os.path.join(ROOT, "tests", "data")),
                   help="a folder with local copies of the benchmark files (default $EM_DATA_DIR, else the "
                   "excerpts in tests/data)")
    p.add_argument("--template", default=None, help="prompt template (default qwen-math; plain without a chat "
                   "template)")
    p.add_argument("--n-prompts", type=int, default=32, help="number of prompts")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (both engines)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new-token budget")
    p.add_argument("--length-mix", default=None, help="LO:HI: per-row budgets uniform in [LO, HI] (default for "
                   "--shape: 16:max-new-tokens; real models stop by themselves)")
    p.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off", "both"], help="continuous "
                   "batching's CUDA graphs (GPU): transformers' choice, forced on, off, or both runs")
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float32"], help="default $EM_DTYPE, else "
                   "auto: as evaluate.py (bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-static", action="store_true", help="continuous runs only (no comparison)")
    p.add_argument("--json", action="store_true", help="also print the figures as one line 'RESULT {json}'")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = build(args, device)
    if args.model or os.path.isfile(os.path.join(args.data_dir, ev.BENCHMARKS[args.benchmark][0])):
        problems = ev.load_benchmark(args.benchmark, args.data_dir, limit=args.n_prompts)
    else:  # random weights and no benchmark files (the device machine): synthetic problems of varied length
        print(f"no {args.benchmark} file under {args.data_dir}: synthetic problems")
        problems = [{"problem": f"Compute {i} + {3 * i + 1}, then " + "multiply it by 2, " * (i % 7) + "and report it."}
                    for i in range(args.n_prompts)]
    template = args.template or ("qwen-math" if tok.chat_template else "plain")
    prompts = [ev.build_prompt(tok, q["problem"], template) for q in problems]
    mix = args.length_mix or (None if args.model else f"{min(16, args.max_new_tokens)}:{args.max_new_tokens}")
    limits = None
    if mix:
        lo, hi = map(int, mix.split(":"))
        rng = random.Random(0)
        limits = [rng.randint(lo, min(hi, args.max_new_tokens)) for _ in prompts]
    engines = ["static"] * (not args.skip_static) + {
        "auto": ["continuous"], "on": ["continuous+graphs"], "off": ["continuous-graphs"],
        "both": ["continuous-graphs", "continuous+graphs"]}[args.cuda_graph]
    lengths = [len(tok(x, add_special_tokens=False).input_ids) for x in prompts]
    print(f"{device}, {args.model or args.shape}, {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, lengths: {mix or 'the model stops'}, "
          f"threads {torch.get_num_threads()}")
    ev.generate_batch(model, tok, prompts[:2], 4, engine="static")  # warm-up (allocator, kernels)
    ev.generate_batch(model, tok, prompts[:2], 4, engine="continuous")
    # Engines alternate batch by batch, so a change in the machine's load hits all of them alike.
    outs = {e: [] for e in engines}
    stats = {e: dict(wall=0.0, cpu=0.0, peak=0.0) for e in engines}
    rss0 = rss_gb()
    for b in range(0, len(prompts), args.batch_size):
        for e in engines:
            res, wall, cpu, peak = run_batch(e, model, tok, prompts[b:b + args.batch_size],
                                             limits[b:b + args.batch_size] if limits else None, args, device)
            outs[e] += res
            st = stats[e]
            st["wall"], st["cpu"], st["peak"] = st["wall"] + wall, st["cpu"] + cpu, max(st["peak"], peak)
        print(f"  batch {b // args.batch_size + 1}: " + ", ".join(f"{e} {stats[e]['wall']:.0f} s" for e in engines),
              flush=True)
    # fp32: the engines' greedy outputs must be identical. bf16: the packed and the padded batch round differently
    # (other kernels, other reduction orders), so a near-tie between two tokens can flip and the row diverges from
    # there; counted and reported, not asserted.
    ref, same = outs[engines[0]], {}
    for e in engines[1:]:
        diff = [i for i, (x, y) in enumerate(zip(ref, outs[e])) if x["ids"] != y["ids"] or x["truncated"] !=
                y["truncated"]]
        if diff and model.dtype == torch.float32:
            raise AssertionError(f"{e}: greedy outputs differ from {engines[0]} on prompts {diff[:10]}")
        same[e] = len(ref) - len(diff)
        if diff:
            first = [next((j for j, (a, b) in enumerate(zip(ref[i]["ids"], outs[e][i]["ids"])) if a != b),
                          min(len(ref[i]["ids"]), len(outs[e][i]["ids"]))) for i in diff]
            print(f"{e}: {len(diff)} of {len(ref)} greedy outputs differ from {engines[0]} ({model.dtype}: rounding); "
                  f"first differing token at {min(first)}-{max(first)}, median {sorted(first)[len(first) // 2]}")
    results = {}
    for e in engines:
        st, new = stats[e], sum(len(o["ids"]) for o in outs[e])
        results[e] = dict(st, tokens=new, tok_s=new / st["wall"])
        print(f"{e:18s} wall {st['wall']:7.1f} s  CPU {st['cpu']:7.1f} s  {new} new tokens  "
              f"{results[e]['tok_s']:8.1f} tok/s  peak mem {st['peak']:.2f} GB", flush=True)
    print(f"RSS after all runs - before: {rss_gb() - rss0:+.3f} GB")
    if "static" in results:
        s = results["static"]
        lens = [len(o["ids"]) for o in ref]
        print(f"static: {100 * static_waste(prompts, ref, tok, args.batch_size):.1f}% of decode row-steps on "
              f"stopped rows; new lengths {min(lens)}-{max(lens)}, mean {sum(lens) / len(lens):.0f}, "
              f"{sum(o['truncated'] for o in ref)} truncated")
        for e, r in results.items():
            if e != "static":
                print(f"{e}: {r['tok_s'] / s['tok_s']:.2f}x static tokens/s ({s['cpu'] / r['cpu']:.2f}x in CPU "
                      f"time), {same[e]} of {len(ref)} greedy outputs identical")
    if args.json:
        print("RESULT " + json.dumps({"device": device, "model": args.model or args.shape, "prompts": len(prompts),
                                      "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                                      "dtype": str(model.dtype), "identical_outputs": same,
                                      "engines": results, "static_waste": static_waste(prompts, ref, tok,
                                                                                       args.batch_size)
                                      if "static" in results else None}))


if __name__ == "__main__":
    main()

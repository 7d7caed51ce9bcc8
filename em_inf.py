"""
EM-INF: inference-time entropy minimization (Agarwal et al., arXiv 2505.15134), and its cheap baseline, adaptive
temperature -- both batched, both as a transformers LogitsProcessor. No training: the model is never changed.

EM-INF, at every decoding step and for every sequence of the batch separately: take the step's logits z (fp32
copy), run a few Adam steps on
        loss(z) = H(softmax(z)) + kl_weight * KL(p0 || softmax(z)),        p0 = softmax(model's logits),
stopping a row for good once its entropy is below --threshold (checked before each step: a row already under it
is left untouched), then sample from softmax(z' / T). Released defaults: 3 steps, lr 0.1, threshold 0.3,
kl_weight 0.05, T 0.1, 4096 new tokens (the paper's text: 5-15 steps, threshold 0.1-0.5). It must sample: the
update sharpens the distribution around its argmax (the paper: the argmax does not change), so greedy = plain greedy.
Adaptive temperature: per row, if H0 = H(softmax z) > --at-threshold, bisect tau in [tmin, tmax] until
|H(softmax(z / tau)) - max(at_threshold, target_ratio * H0)| < tol (at most max_iter halvings), then sample from
softmax(z / tau) at T = 1. Released defaults: target_ratio 0.85, [0.01, 1], tol 0.1, 100, 1e-5 (the paper's text
says target_ratio 0.4-0.6 works best: try --target-ratio 0.5).

Order, made explicit: the model's logits -> update (EM-INF or adaptive temperature) -> repetition penalty -> divide by
--temperature -> top-k -> top-p -> sample, as in the released script (it updates the raw logits, then runs generate's
processors). transformers applies its own penalty BEFORE custom processors, so the processor applies the penalty and
the division itself and `generate` runs at temperature 1 with only top-k/top-p (its warpers run after custom ones).

Sampling settings (--sampling-config): `model` (default, the release): top-k, top-p and repetition penalty from the
model's generation_config.json, the temperature overridden (Qwen2.5-7B-Instruct: top-k 20, top-p 0.8, penalty 1.05; an
unset field takes transformers' default: top-k 50, top-p 1, penalty 1); `clean`: top-k off, top-p 1, no penalty. One
setting for every mode, so EM-INF, plain and adaptive temperature stay comparable (the release ran its plain and
adaptive-temperature baselines through vLLM 0.7.3 with a SamplingParams that sets only the temperature, i.e. clean).
--top-k / --top-p / --repetition-penalty override single fields. The effective values are in results.json's protocol.

Released code (made Table 3) vs here:
| released                                           | here                                    | flag              |
|----------------------------------------------------|-----------------------------------------|-------------------|
| entropy summed over the batch (runs batch 1)       | per row: rows are independent           | -                 |
| +1e-12 inside the entropy's log                    | exact; -inf logits stay out             | -                 |
| autograd + torch.optim.Adam, break under threshold | closed form, on-device stop (tested =)  | -                 |
| sampler floors probabilities at 1e-9               | plain softmax                           | -                 |
| EM-INF: model generation_config, T overridden      | the same, in every mode (default)       | --sampling-config |
| plain, adaptive-temp: vLLM SamplingParams, T only  | `clean` (top-k off, top-p 1, no penalty) | --sampling-config |
Rows are independent in exact arithmetic; on CPU a row's result alone and inside a batch are bit-identical (tested),
on CUDA reductions may round differently per batch shape (logits agree to ~1e-4 where Adam's eps amplifies it).
Left out: self-consistency, resuming an interrupted run.

    # 1 GPU: EM-INF with plain sampling from the same code path as the baseline (Table 3's five benchmarks)
    python em_inf.py --model Qwen/Qwen2.5-7B-Instruct --compare-plain
    python em_inf.py --model Qwen/Qwen2.5-7B-Instruct --benchmarks math500,amc23 --mode adaptive-temp --compare-plain
    # 8 GPUs: the problems are split across ranks; rank 0 gathers, grades the totals and writes
    torchrun --nproc_per_node=8 em_inf.py --model Qwen/Qwen2.5-7B-Instruct --compare-plain
    # CPU smoke run on the tiny random model (gibberish answers, exercises every code path)
    python tests/tiny_model.py /tmp/tiny
    python em_inf.py --model /tmp/tiny --data-dir ../shared/benchmarks --benchmarks math500 --limit 8 \
        --max-new-tokens 32 --batch-size 4 --compare-plain --out /tmp/em_inf_smoke

In code: `model.generate(**enc, do_sample=True, temperature=1.0, top_k=20, top_p=0.8,
logits_processor=[EMInfProcessor(minimize_logit_entropy, temperature=0.1, repetition_penalty=1.05)])`.
Outputs in --out: results.json (accuracy, mean entropy of the sampling distribution before/after the update,
tokens/s, per mode and benchmark; protocol, versions, args) and samples.jsonl (one line per response).
"""
import argparse, functools, json, math, os, time

import torch
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

import evaluate
from evaluate import EvalError


def token_entropy(logits):
    """Entropy of softmax(logits) per row, in nats; entr(0) = 0, so -inf logits count as absent tokens."""
    return torch.special.entr(torch.softmax(upcast(logits), -1)).sum(-1)


def upcast(x):
    return x if x.dtype == torch.float64 else x.float()  # bf16/fp16 logits -> fp32; fp64 (tests) stays fp64


# ---- method: EM-INF logit update (per row, batched; copy this block) ----
@torch.no_grad()
def minimize_logit_entropy(logits, n_steps=3, lr=0.1, threshold=0.3, kl_weight=0.05, betas=(0.9, 0.999), eps=1e-8):
    """Adam on an fp32 copy z of logits [B, V] minimizing H(softmax z) + kl_weight * KL(p0 || softmax z), each
    row on its own: Adam's state is elementwise and the loss is a sum of per-row terms, so a row gets exactly
    what it would get alone. A row stops for good the first time H < threshold (checked before each step)."""
    z = upcast(logits).clone()
    p0 = torch.softmax(z, -1)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    active = torch.ones_like(z[:, :1], dtype=torch.bool)
    for t in range(1, n_steps + 1):
        p = p0 if t == 1 else torch.softmax(z, -1)
        ent = torch.special.entr(p)  # -p log p, exactly 0 where p = 0: -inf logits stay out of H and its gradient
        H = ent.sum(-1, keepdim=True)
        active &= H >= threshold  # an on-device mask instead of `break`: no host sync, and once off, always off
        # Closed-form gradient (what autograd gives): dH/dz = -p (log p + H), dKL(p0||p)/dz = p - p0, so
        # g = entr(p) - p (H - kl_weight) - kl_weight p0, in two kernels.
        g = torch.addcmul(ent, p, H - kl_weight, value=-1).sub_(p0, alpha=kl_weight)
        # torch.optim.Adam's update at step t, written out; lr / bc1 * m / (sqrt(v / bc2) + eps) is computed as
        # lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps * sqrt(bc2)) to save a kernel.
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        bc1, sqrt_bc2 = 1 - betas[0] ** t, math.sqrt(1 - betas[1] ** t)
        z.addcdiv_(m * active, v.sqrt().add_(eps * sqrt_bc2), value=-lr * sqrt_bc2 / bc1)  # stopped rows add 0
    return z
# ---- end method ----


@torch.no_grad()
def adaptive_temperature(logits, target_ratio=0.85, tmin=0.01, tmax=1.0, tol=0.1, max_iter=100, threshold=1e-5):
    """Per row: bisect tau so that H(softmax(z / tau)) is within tol of max(threshold, target_ratio * H0); rows with
    H0 <= threshold come back unchanged. Like the release, tau is the last midpoint tried (converged or not)."""
    z = upcast(logits)
    H0 = token_entropy(z)[:, None]
    target = (target_ratio * H0).clamp_min(threshold)
    lo, hi = torch.full_like(H0, tmin), torch.full_like(H0, tmax)
    tau, done = torch.ones_like(H0), H0 <= threshold
    for i in range(max_iter):
        mid = (lo + hi) / 2
        H = token_entropy(z / mid)[:, None]
        hit = (H - target).abs() < tol
        tau = torch.where(done, tau, mid)
        lo = torch.where(~done & ~hit & (H < target), mid, lo)  # too sharp: a higher temperature
        hi = torch.where(~done & ~hit & (H >= target), mid, hi)
        done |= hit
        if i % 8 == 7 and bool(done.all()):  # one host sync per 8 halvings; finished rows no longer change
            break
    return z / tau


class EMInfProcessor(LogitsProcessor):
    """adjust(scores) (minimize_logit_entropy, adaptive_temperature, or None for plain sampling), then the repetition
    penalty, then / temperature: the released order (its update runs on the raw logits, then generate's processors:
    penalty, temperature, top-k, top-p). transformers runs its own penalty BEFORE custom processors, so the penalty is
    applied here and generate gets repetition_penalty 1; top-k/top-p stay generate's (its warpers come after custom
    processors). Also sums, on the device, the entropy of the sampling distribution before (no update) and after the
    update over unfinished rows: a row whose last token is a stop or pad token has finished (generate pads it)."""

    def __init__(self, adjust=None, temperature=1.0, stop_ids=(), repetition_penalty=1.0):
        self.adjust, self.temperature = adjust, temperature
        self.penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1 else None
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        # entropy before / after at the sampling temperature, the same at T = 1 (what EM-INF lowers), scored rows
        self.sums = torch.zeros(5, dtype=torch.float64)

    def __call__(self, input_ids, scores):
        adjusted = self.adjust(scores) if self.adjust else scores
        if self.penalty:  # (on the prompt and the response so far, as transformers' processor always does)
            scores, adjusted = self.penalty(input_ids, scores.clone()), self.penalty(input_ids, adjusted.clone())
        out = adjusted / self.temperature
        self.stop_ids = self.stop_ids.to(input_ids.device)
        live = ~torch.isin(input_ids[:, -1], self.stop_ids)
        h = [token_entropy(scores / self.temperature), token_entropy(out)]
        h += [token_entropy(scores), token_entropy(adjusted)] if self.temperature != 1 else h
        stats = torch.stack([(x * live).sum() for x in h] + [live.sum()])  # (x[live] would sync: nonzero)
        self.sums = self.sums.to(scores.device) + stats.double()  # stays on the device: no sync per token
        return out


def sampling_settings(model, args):
    """(top_k, top_p, repetition_penalty). --sampling-config model (default): the released EM-INF sampled with
    model.generation_config, only the temperature overridden (Qwen2.5-7B-Instruct: top-k 20, top-p 0.8, penalty
    1.05); a field the model leaves unset takes transformers' default (top-k 50, top-p 1, penalty 1). clean: top-k
    off, top-p 1, no penalty. --top-k / --top-p / --repetition-penalty, when given, override either."""
    g = model.generation_config if args.sampling_config == "model" else None

    def pick(flag, field, unset, clean):
        value = None if g is None else getattr(g, field, None)
        return flag if flag is not None else clean if g is None else unset if value is None else value
    return (pick(args.top_k, "top_k", 50, 0), pick(args.top_p, "top_p", 1.0, 1.0),
            pick(args.repetition_penalty, "repetition_penalty", 1.0, 1.0))


# what results.json reports: mean entropy over generated tokens of unfinished rows, before/after the update
ENTROPY_KEYS = ("entropy_before", "entropy_after", "entropy_t1_before", "entropy_t1_after")


def main(argv=None):
    parser = argparse.ArgumentParser(description="EM-INF / adaptive-temperature decoding on math benchmarks.")
    # --- model and data
    parser.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    parser.add_argument("--benchmarks", default="math500,aimo-amc,aimo-aime,minerva,olympiadbench",
                        help=f"comma list of {', '.join(evaluate.BENCHMARKS)} or .json/.jsonl/.parquet files "
                        "(default: Table 3's five)")
    parser.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="folder with local copies of the "
                        "benchmark files (e.g. ../shared/benchmarks); default $EM_DATA_DIR, else the Hub")
    parser.add_argument("--limit", type=evaluate.pos_int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--template", default="agarwal", choices=list(evaluate.TEMPLATES), help="prompt format; "
                        "agarwal = Qwen-Math system prompt + 'Let us think step by step...' (their protocol)")
    # --- method
    parser.add_argument("--mode", default="em-inf", choices=["em-inf", "adaptive-temp", "plain"], help="the update")
    parser.add_argument("--compare-plain", action="store_true", help="also run plain sampling (same code path, "
                        "temperature and seeds) and report both")
    parser.add_argument("--n-steps", type=evaluate.nonneg_int, default=3, help="EM-INF: Adam steps per token "
                        "(released script 3)")
    parser.add_argument("--lr", type=evaluate.nonneg_float, default=0.1, help="EM-INF: Adam learning rate on "
                        "the logits")
    parser.add_argument("--threshold", type=evaluate.nonneg_float, default=0.3, help="EM-INF: stop a row once its "
                        "entropy (nats, T=1) is below this; in [0, log V]")
    parser.add_argument("--kl-weight", type=evaluate.nonneg_float, default=0.05, help="EM-INF: weight of KL(p0 || p) "
                        "(release's script 0.05; its function default 0.001)")
    parser.add_argument("--target-ratio", type=evaluate.unit_float, default=0.85, help="adaptive-temp: target entropy "
                        "/ initial entropy (released script 0.85; the paper: 0.4-0.6 best)")
    parser.add_argument("--tmin", type=evaluate.pos_float, default=0.01, help="adaptive-temp: lowest temperature")
    parser.add_argument("--tmax", type=evaluate.pos_float, default=1.0, help="adaptive-temp: highest temperature")
    parser.add_argument("--tol", type=evaluate.pos_float, default=0.1, help="adaptive-temp: entropy tolerance (nats)")
    parser.add_argument("--max-iter", type=evaluate.pos_int, default=100, help="adaptive-temp: most bisection steps")
    parser.add_argument("--at-threshold", type=evaluate.nonneg_float, default=1e-5, help="adaptive-temp: rows with "
                        "entropy at or below this keep their logits; also the lowest target")
    # --- decoding
    parser.add_argument("--temperature", type=evaluate.pos_float, default=None, help="sampling temperature after the "
                        "update (default: 0.1 for em-inf and plain, 1.0 for adaptive-temp, as released)")
    parser.add_argument("--sampling-config", default="model", choices=["model", "clean"], help="model (released "
                        "EM-INF): the model's generation_config top-k/top-p/repetition penalty, temperature "
                        "overridden; clean: top-k off, top-p 1, no penalty. Applies to every mode (comparable)")
    parser.add_argument("--top-k", type=evaluate.nonneg_int, default=None, help="override the top-k of "
                        "--sampling-config (0 = off)")
    parser.add_argument("--top-p", type=evaluate.unit_float, default=None, help="override the top-p of "
                        "--sampling-config")
    parser.add_argument("--repetition-penalty", type=evaluate.pos_float, default=None, help="override the penalty of "
                        "--sampling-config (applied after the update, before the temperature, as released)")
    parser.add_argument("--max-new-tokens", type=evaluate.pos_int, default=4096, help="generation budget per response")
    parser.add_argument("--n", type=evaluate.pos_int, default=1, help="samples per problem (pass@1 is their mean)")
    parser.add_argument("--seed", type=evaluate.seed_int, default=0, help="sampling seed (each batch: seed, "
                        "benchmark, index)")
    parser.add_argument("--answer-fallback", action="store_true", help="no \\boxed{}: grade \"the answer is X\" "
                        "or the last number (evaluate.py's flag)")
    # --- system
    parser.add_argument("--batch-size", type=evaluate.pos_int, default=64, help="sequences per generate call (per GPU)")
    parser.add_argument("--engine", default="auto", choices=["auto", "continuous", "static"], help="generation "
                        "engine (see evaluate.py)")
    parser.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float32"], help="auto (default, or "
                        "$EM_DTYPE): bf16 on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the EM-INF update (CUDA)")
    parser.add_argument("--out", default=None, help="output folder (default eval_out/em_inf-<model name>)")
    evaluate.cli_main(run, parser.parse_args(argv), resumes=False)


def run(args):
    if args.tmin >= args.tmax:  # (argparse has checked each number's own range)
        raise EvalError(f"--tmin {args.tmin} must be below --tmax {args.tmax}")
    out = args.out or os.path.join("eval_out", "em_inf-" + os.path.basename(args.model.rstrip("/")))
    evaluate.check_out_dir(out)  # before the model loads: the outputs are written only at the end
    # --- setup: under torchrun each rank takes every world-th problem; rank 0 gathers and writes
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # so load_model's "cuda" is this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # --- data
    data = {}
    for src in args.benchmarks.split(","):
        name = os.path.splitext(os.path.basename(src))[0] if src.endswith((".json", ".jsonl", ".parquet")) else src
        if name in data:  # names key the samples and the results: two files must not share one
            raise EvalError(f"two benchmarks are named {name!r} ({src}): give the files different names")
        data[name] = evaluate.load_benchmark(src, args.data_dir, limit=args.limit)
        if rank == 0 and (missing := sum(p["answer"] is None for p in data[name])):  # results.json: no_gold
            print(f"{name}: {missing} problems have no gold answer and are graded wrong")
    # --- model
    model, tokenizer = evaluate.load_model(args.model, args.dtype)
    vocab = model.get_output_embeddings().out_features
    if args.threshold > math.log(vocab):
        raise EvalError(f"--threshold {args.threshold} is above log V = {math.log(vocab):.2f}, the largest entropy "
                        f"over this model's {vocab} tokens: every row would stop before its first step")
    stops = evaluate.stop_token_ids(tokenizer, model) + [tokenizer.pad_token_id]
    update = torch.compile(minimize_logit_entropy, dynamic=True) if args.compile else minimize_logit_entropy
    adjust = {"em-inf": functools.partial(update, n_steps=args.n_steps, lr=args.lr, threshold=args.threshold,
                                          kl_weight=args.kl_weight),
              "adaptive-temp": functools.partial(adaptive_temperature, target_ratio=args.target_ratio,
                                                 tmin=args.tmin, tmax=args.tmax, tol=args.tol,
                                                 max_iter=args.max_iter, threshold=args.at_threshold),
              "plain": None}
    temperature = args.temperature or (1.0 if args.mode == "adaptive-temp" else 0.1)
    top_k, top_p, penalty = sampling_settings(model, args)
    modes = [args.mode] + (["plain"] if args.compare_plain and args.mode != "plain" else [])
    # --- warm-up: one short batch per mode before anything is timed. The first generate of a process pays one-off
    # costs (allocator growth, kernel selection), which one report (a 0.5B model) saw as EM-INF/plain 0.70x in one
    # process against 0.89x in two.
    first = next(iter(data.values()))[rank::world][:args.batch_size]
    for mode in modes if first else []:
        evaluate.generate_batch(model, tokenizer, [evaluate.build_prompt(tokenizer, p["problem"], args.template)
                                                   for p in first], 4, 1.0, top_p, top_k=top_k,
                                logits_processor=[EMInfProcessor(adjust[mode], temperature, stops, penalty)])
    # --- loop: each mode over each benchmark; plain (if asked) runs the same prompts, seeds and temperature
    results, all_samples, t_start = {}, [], time.time()
    for mode in modes:
        results[mode] = {}
        for name, problems in data.items():
            proc, shard, samples = EMInfProcessor(adjust[mode], temperature, stops, penalty), problems[rank::world], []
            t0 = time.time()
            if shard:  # (more ranks than problems: an empty shard still joins the gather below)
                # generate samples at T = 1 with only top-k/top-p: the processor has applied penalty and / T
                _, samples = evaluate.evaluate_model(
                    model, tokenizer, shard, template=args.template, max_new_tokens=args.max_new_tokens,
                    temperature=1.0, top_p=top_p, n=args.n, batch_size=args.batch_size, seed=args.seed + rank,
                    name=name, progress=rank == 0, logits_processor=[proc], answer_fallback=args.answer_fallback,
                    top_k=top_k, engine=args.engine)  # the EM-INF processor is custom: auto runs it on the static path
            gathered = [(samples, proc.sums.tolist(), time.time() - t0)]  # .tolist(): the one sync per benchmark
            if world > 1:
                gathered = gathered * world
                dist.all_gather_object(gathered, gathered[rank])
            order = {p["id"]: i for i, p in enumerate(problems)}  # back to the benchmark's order after the gather
            samples = sorted((s for g in gathered for s in g[0]), key=lambda s: (order[s["id"]], s["sample"]))
            sums = [sum(g[1][i] for g in gathered) for i in range(5)]
            m = evaluate.compute_metrics(samples, args.n)
            m.update({k: x / max(sums[4], 1) for k, x in zip(ENTROPY_KEYS, sums)}, scored_tokens=sums[4],
                     tokens_per_s=sum(s["length"] for s in samples) / max(max(g[2] for g in gathered), 1e-9))
            results[mode][name] = m
            all_samples += [{**s, "mode": mode} for s in samples]
    if world > 1:
        dist.barrier()  # all ranks tear gloo/NCCL down together (one rank alone can abort at exit)
        dist.destroy_process_group()
    if rank != 0:
        return
    # --- outputs
    with open(os.path.join(out, "samples.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in all_samples)
    os.replace(os.path.join(out, "samples.jsonl.tmp"), os.path.join(out, "samples.jsonl"))
    protocol = {"model": args.model, "template": args.template, "system_prompt": evaluate.TEMPLATES[args.template][0],
                "user_template": evaluate.TEMPLATES[args.template][1], "temperature": temperature,
                "sampling_config": args.sampling_config, "top_k": top_k, "top_p": top_p,
                "repetition_penalty": penalty, "max_new_tokens": args.max_new_tokens, "n": args.n, "seed": args.seed,
                "world_size": world, "benchmarks": {k: len(v) for k, v in data.items()},
                "dtype": str(model.dtype).replace("torch.", ""),
                "order": "logits -> update -> repetition penalty -> / temperature -> top-k -> top-p -> sample"}
    evaluate.write_json_atomic(os.path.join(out, "results.json"), {
        "metrics": results, "protocol": protocol, "versions": evaluate.package_versions(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "wall_s": time.time() - t_start, "args": vars(args)})
    print(f"| mode | benchmark | pass@1 | H before (T={temperature:g}) | H after | H before (T=1) | H after (T=1) "
          "| tokens/s |\n" + "|---" * 8 + "|")
    for mode, per in results.items():
        for name, m in per.items():
            print(f"| {mode} | {name} | {m['pass@1']:.1f} | " + " | ".join(f"{m[k]:.4g}" for k in ENTROPY_KEYS)
                  + f" | {m['tokens_per_s']:.1f} |")
    print(f"wrote {out}/results.json and {out}/samples.jsonl")


if __name__ == "__main__":
    main()

"""
EM-INF (Agarwal et al., arXiv 2505.15134): inference-time entropy minimization, and its cheap
baseline, adaptive temperature, as batched transformers LogitsProcessors. The model never changes.

EM-INF: at each decoding step, per row, Adam on a copy z of the logits minimizing
H(softmax z) + kl_weight * KL(p0 || softmax z); a row stops once H < --threshold. Then it SAMPLES
(the argmax does not move: greedy would be plain greedy). Adaptive temperature: per row with
H0 > --at-threshold, bisect tau until H(softmax(z / tau)) is within tol of
max(at_threshold, target_ratio * H0), then sample at T=1. Order, as released: logits -> update ->
repetition penalty -> / T -> top-k -> top-p -> sample. --engine vllm (auto: where installed): the
update runs in vLLM's worker (evaluate.VLLMLogits), in the same order; the entropies before and
after it are measured on the static engine only.

    python em_inf.py --model Qwen/Qwen2.5-7B-Instruct --compare-plain        # 1 GPU, Table 3
    torchrun --nproc_per_node=8 em_inf.py --model Qwen/Qwen2.5-7B-Instruct    # problems split
    python tests/tiny_model.py /tmp/tiny && python em_inf.py --model /tmp/tiny --data-dir \\
        tests/data --benchmarks math500 --max-new-tokens 32 --compare-plain --out /tmp/inf  # CPU

Released code (made Table 3) vs here:
  released                                        here                            flag
  entropy summed over the batch (run at batch 1)  rows independent (tested)       -
  +1e-12 inside the log; sampler floors at 1e-9   exact; -inf logits stay out     -
  autograd + torch.optim.Adam, break per step     closed form, on-device stop     -
  EM-INF: the model's generation_config, T set    the same for every mode         --sampling-config
  plain, adaptive: vLLM, only T set               `clean`: no top-k/top-p/penalty --sampling-config
Defaults are the released script's (3 steps, ratio 0.85); the paper's text says 5-15 steps,
ratio 0.4-0.6. Left out: self-consistency, resuming. Outputs: results.json (accuracy, entropy
before/after the update, tokens/s per mode and benchmark), samples.jsonl.
"""
import argparse, functools, math, os, time

import torch
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

import evaluate as ev


# ---- method: EM-INF logit update (per row, batched); copy this block ----
@torch.no_grad()
def minimize_logit_entropy(logits, n_steps=3, lr=0.1, threshold=0.3, kl_weight=0.05,
                           betas=(0.9, 0.999), eps=1e-8):
    """Adam on an fp32 copy z of logits [B, V] minimizing H(softmax z) + kl_weight * KL(p0 ||
    softmax z), each row on its own (Adam is elementwise and the loss a sum of per-row terms: a
    row gets what it gets alone). A row stops for good once H < threshold (checked each step)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)  # bf16 -> fp32
    p0 = torch.softmax(z, -1)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    active = torch.ones_like(z[:, :1], dtype=torch.bool)
    for t in range(1, n_steps + 1):
        p = p0 if t == 1 else torch.softmax(z, -1)
        ent = torch.special.entr(p)  # -p log p, 0 where p = 0: -inf logits stay out of H and grad
        H = ent.sum(-1, keepdim=True)
        active &= H >= threshold  # an on-device mask, not `break`: no host sync; off stays off
        # closed-form gradient (autograd's): dH/dz = -p (log p + H), dKL(p0||p)/dz = p - p0
        g = torch.addcmul(ent, p, H - kl_weight, value=-1).sub_(p0, alpha=kl_weight)
        # torch.optim.Adam's step t written out: lr / bc1 * m / (sqrt(v / bc2) + eps), computed
        # as lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps * sqrt(bc2)) to save a kernel
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        bc1, sqrt_bc2 = 1 - betas[0] ** t, math.sqrt(1 - betas[1] ** t)
        z.addcdiv_(m * active, v.sqrt().add_(eps * sqrt_bc2), value=-lr * sqrt_bc2 / bc1)
    return z
# ---- end method ----


def upcast(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; fp64 (tests) stays


def token_entropy(logits):
    """Entropy of softmax(logits) per row, in nats; entr(0) = 0: -inf logits are absent tokens."""
    return torch.special.entr(torch.softmax(upcast(logits), -1)).sum(-1)


@torch.no_grad()
def adaptive_temperature(logits, target_ratio=0.85, tmin=0.01, tmax=1.0, tol=0.1, max_iter=100,
                         threshold=1e-5):
    """Per row: bisect tau until H(softmax(z / tau)) is within tol of max(threshold, target_ratio
    * H0); rows with H0 <= threshold stay. As released, tau is the last midpoint tried."""
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
        if i % 8 == 7 and bool(done.all()):  # a host sync per 8 halvings; done rows stay
            break
    return z / tau


class EMInfProcessor(LogitsProcessor):
    """adjust(scores) (minimize_logit_entropy, adaptive_temperature, or None: plain sampling), the
    repetition penalty, / temperature: the released order. transformers runs its own penalty
    BEFORE custom processors, so it is applied here (generate gets penalty 1); top-k/top-p stay
    generate's (its warpers run after). Also sums on the device the entropy of the sampling
    distribution before and after the update over unfinished rows (last token not a stop/pad)."""

    def __init__(self, adjust=None, temperature=1.0, stop_ids=(), repetition_penalty=1.0):
        self.adjust, self.temperature = adjust, temperature
        self.penalty = (RepetitionPenaltyLogitsProcessor(repetition_penalty)
                        if repetition_penalty != 1 else None)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        # entropy before / after at the sampling T, the same at T = 1 (what EM-INF lowers), rows
        self.sums = torch.zeros(5, dtype=torch.float64)

    def __call__(self, input_ids, scores):
        adjusted = self.adjust(scores) if self.adjust else scores
        if self.penalty:  # on the prompt and the response so far, as transformers' processor
            scores = self.penalty(input_ids, scores.clone())
            adjusted = self.penalty(input_ids, adjusted.clone())
        out = adjusted / self.temperature
        self.stop_ids = self.stop_ids.to(input_ids.device)
        live = ~torch.isin(input_ids[:, -1], self.stop_ids)
        h = [token_entropy(scores / self.temperature), token_entropy(out)]
        h += [token_entropy(scores), token_entropy(adjusted)] if self.temperature != 1 else h
        stats = torch.stack([(x * live).sum() for x in h] + [live.sum()])  # x[live] would sync
        self.sums = self.sums.to(scores.device) + stats.double()  # on the device: no sync
        return out


def sampling_settings(model, args):
    """(top_k, top_p, repetition_penalty). --sampling-config model (the released EM-INF): the
    model's generation_config with the temperature overridden (Qwen2.5-7B-Instruct: 20, 0.8, 1.05;
    unset fields: transformers' 50, 1, 1); clean: off, 1, 1. --top-k/--top-p/--repetition-penalty
    override either."""
    g = model.generation_config if args.sampling_config == "model" else None

    def pick(flag, field, unset, clean):
        value = None if g is None else getattr(g, field, None)
        return (flag if flag is not None else clean if g is None else
                unset if value is None else value)
    return (pick(args.top_k, "top_k", 50, 0), pick(args.top_p, "top_p", 1.0, 1.0),
            pick(args.repetition_penalty, "repetition_penalty", 1.0, 1.0))


# results.json: mean entropy over generated tokens of unfinished rows, before/after the update
ENTROPY_KEYS = ("entropy_before", "entropy_after", "entropy_t1_before", "entropy_t1_after")


def main(argv=None):
    p = argparse.ArgumentParser(description="EM-INF / adaptive-temperature decoding.")
    arg = p.add_argument
    # ---- model and data ----
    arg("--model", required=True, help="hub id or local folder of a causal LM")
    arg("--benchmarks", default="math500,aimo-amc,aimo-aime,minerva,olympiadbench",
        help="comma list of evaluate.py benchmarks or files (default: Table 3's five)")
    arg("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="a folder with local "
        "copies of the benchmark files (default $EM_DATA_DIR, else the Hub)")
    arg("--limit", type=ev.pos_int, help="first N problems of each benchmark")
    arg("--template", default="agarwal", choices=list(ev.TEMPLATES),
        help="prompt format (agarwal: their protocol)")
    # ---- method ----
    arg("--mode", default="em-inf", choices=["em-inf", "adaptive-temp", "plain"])
    arg("--compare-plain", action="store_true", help="also plain sampling, same code "
        "path, temperature and seeds")
    arg("--n-steps", type=ev.nonneg_int, default=3, help="EM-INF: Adam steps per token")
    arg("--lr", type=ev.nonneg_float, default=0.1, help="EM-INF: Adam lr on the logits")
    arg("--threshold", type=ev.nonneg_float, default=0.3, help="EM-INF: stop a row once "
        "its entropy (nats, T=1) is below this")
    arg("--kl-weight", type=ev.nonneg_float, default=0.05, help="EM-INF: weight of "
        "KL(p0 || p) (the script's; its function default 0.001)")
    arg("--target-ratio", type=ev.unit_float, default=0.85, help="adaptive-temp: target "
        "/ initial entropy (the paper: 0.4-0.6 best)")
    arg("--tmin", type=ev.pos_float, default=0.01, help="adaptive-temp: lowest T")
    arg("--tmax", type=ev.pos_float, default=1.0, help="adaptive-temp: highest T")
    arg("--tol", type=ev.pos_float, default=0.1, help="adaptive-temp: tolerance (nats)")
    arg("--max-iter", type=ev.pos_int, default=100, help="adaptive-temp: most halvings")
    arg("--at-threshold", type=ev.nonneg_float, default=1e-5, help="adaptive-temp: rows "
        "at or below this entropy stay; also the lowest target")
    # ---- decoding ----
    arg("--temperature", type=ev.pos_float, help="after the update (default 0.1; "
        "adaptive-temp 1.0, as released)")
    arg("--sampling-config", default="model", choices=["model", "clean"], help="model: "
        "the model's top-k/top-p/penalty (released EM-INF); clean: none. Every mode")
    arg("--top-k", type=ev.nonneg_int, help="override --sampling-config's (0 = off)")
    arg("--top-p", type=ev.unit_float, help="override --sampling-config's")
    arg("--repetition-penalty", type=ev.pos_float, help="override --sampling-config's")
    arg("--max-new-tokens", type=ev.pos_int, default=4096, help="budget per response")
    arg("--n", type=ev.pos_int, default=1, help="samples per problem (pass@1: mean)")
    arg("--seed", type=ev.seed_int, default=0, help="sampling seed (per batch)")
    arg("--answer-fallback", action="store_true", help="as evaluate.py's")
    arg("--allow-code-execution", action="store_true", help="consent to run the model's "
        "programs (code benchmarks, e.g. leetcode: Table 3's column)")
    arg("--code-workers", type=ev.pos_int, help="programs graded in parallel (default: CPUs)")
    # ---- system ----
    arg("--batch-size", type=ev.pos_int, default=64, help="per generate call (per GPU)")
    arg("--engine", default=os.environ.get("EM_ENGINE", "auto"), choices=ev.ENGINES,
        help="static, vllm, auto (default, or $EM_ENGINE): vLLM where installed")
    arg("--dtype", choices=["auto", "bfloat16", "float32"], help="auto (default, or "
        "$EM_DTYPE): bf16 on CUDA and on CPUs with native bf16, else fp32")
    arg("--compile", action="store_true", help="torch.compile the EM-INF update (CUDA)")
    arg("--out", help="output folder (default eval_out/em_inf-<model name>)")
    arg("--dist-timeout", type=ev.pos_float, default=3600, help="torchrun: seconds a collective "
        "waits for a rank")
    ev.cli_main(run, p.parse_args(argv), resumes=False)


def run(args):
    if args.tmin >= args.tmax:  # (argparse has checked each number's own range)
        raise ev.EvalError(f"--tmin {args.tmin} must be below --tmax {args.tmax}")
    out = args.out or os.path.join("eval_out", "em_inf-" + os.path.basename(args.model.rstrip("/")))
    ev.check_out_dir(out)  # before the model loads: the outputs are written only at the end
    rank, world = ev.init_distributed(args.dist_timeout)  # torchrun: every world-th problem
    # ---- data ----
    data = {}
    for src in args.benchmarks.split(","):
        name = os.path.splitext(os.path.basename(src))[0] if src.endswith(
            (".json", ".jsonl", ".parquet")) else src
        if name in data:  # names key the samples and the results
            raise ev.EvalError(f"two benchmarks are named {name!r} ({src}): rename the files")
        data[name] = ev.load_benchmark(src, args.data_dir, limit=args.limit)
        missing = sum(p["answer"] is None and p.get("kind") != "code" for p in data[name])
        if rank == 0 and missing:
            print(f"{name}: {missing} problems have no gold answer and are graded wrong")
    ev.require_code_consent([p for v in data.values() for p in v], args.allow_code_execution)
    # ---- model ----
    # HF (the logits processors below) or vLLM (its processor calls the same update)
    engine = ev.pick_engine(args.engine, "--compile" if args.compile else None)
    model, tokenizer = ev.load_model(args.model, args.dtype) if engine == "static" else (
        ev.load_vllm(args.model, args.dtype, args.seed), ev.load_tokenizer(args.model))
    vocab = model.config.vocab_size
    if args.threshold > math.log(vocab):
        raise ev.EvalError(f"--threshold {args.threshold} is above log V = {math.log(vocab):.2f}, "
                           f"the largest entropy over {vocab} tokens: no row would ever update")
    stops = ev.stop_token_ids(tokenizer, model) + [tokenizer.pad_token_id]
    update = torch.compile(minimize_logit_entropy, dynamic=True) if args.compile else \
        minimize_logit_entropy
    adjust = {"em-inf": functools.partial(update, n_steps=args.n_steps, lr=args.lr,
                                          threshold=args.threshold, kl_weight=args.kl_weight),
              "adaptive-temp": functools.partial(
                  adaptive_temperature, target_ratio=args.target_ratio, tmin=args.tmin,
                  tmax=args.tmax, tol=args.tol, max_iter=args.max_iter,
                  threshold=args.at_threshold),
              "plain": None}
    # vLLM: the update by name in its worker, then its penalty, / T, top-k, top-p: the same order
    em_logits = {"em-inf": ["em_inf:minimize_logit_entropy", adjust["em-inf"].keywords],
                 "adaptive-temp": ["em_inf:adaptive_temperature", adjust["adaptive-temp"].keywords],
                 "plain": None}
    temperature = args.temperature or (1.0 if args.mode == "adaptive-temp" else 0.1)
    top_k, top_p, penalty = sampling_settings(model, args)
    modes = [args.mode] + (["plain"] if args.compare_plain and args.mode != "plain" else [])
    # ---- warm-up ----
    # a short batch per mode before anything is timed (the first generate of a process pays
    # one-off costs: one report saw EM-INF/plain 0.70x in one process, 0.89x in two)
    first = next(iter(data.values()))[rank::world][:args.batch_size] if engine == "static" else []
    for mode in modes if first else []:
        ev.generate_batch(
            model, tokenizer, [ev.build_prompt(tokenizer, p, args.template) for p in first], 4,
            1.0, top_p, top_k=top_k,
            logits_processor=[EMInfProcessor(adjust[mode], temperature, stops, penalty)])
    # ---- loop ----
    # each mode over each benchmark; plain runs the same prompts, seeds and temperature
    results, all_samples, t_start = {}, [], time.time()
    for mode in modes:
        results[mode] = {}
        for name, problems in data.items():
            proc = EMInfProcessor(adjust[mode], temperature, stops, penalty)
            shard, samples, t0 = problems[rank::world], [], time.time()
            if shard:  # (more ranks than problems: an empty shard still joins the gather)
                # static: sampled at T = 1 with top-k/top-p only, the processor applied the
                # penalty and / T; vLLM applies them itself, after em_logits
                vllm = engine == "vllm"
                samples = ev.evaluate_model(
                    model, tokenizer, shard, template=args.template,
                    max_new_tokens=args.max_new_tokens, temperature=temperature if vllm else 1.0,
                    top_p=top_p, top_k=top_k, n=args.n, batch_size=args.batch_size,
                    seed=args.seed + rank, name=name, progress=rank == 0,
                    logits_processor=None if vllm else [proc],
                    em_logits=em_logits[mode] if vllm else None,
                    repetition_penalty=penalty if vllm else 1.0,
                    answer_fallback=args.answer_fallback,
                    code_options={"workers": args.code_workers})[1]
            # .tolist(): the one sync per benchmark
            gathered = ev.gather_lists([(samples, proc.sums.tolist(), time.time() - t0)], world)
            order = {p["id"]: i for i, p in enumerate(problems)}  # the benchmark's order
            samples = sorted((s for g in gathered for s in g[0]),
                             key=lambda s: (order[s["id"]], s["sample"]))
            sums = [sum(g[1][i] for g in gathered) for i in range(5)]
            m = ev.compute_metrics(samples, args.n)
            # (vLLM: its processor runs in its worker; the entropies are the static engine's)
            m.update({k: x / sums[4] if sums[4] else None for k, x in zip(ENTROPY_KEYS, sums)},
                     scored_tokens=sums[4],
                     tokens_per_s=sum(s["length"] for s in samples)
                     / max(max(g[2] for g in gathered), 1e-9))
            results[mode][name] = m
            all_samples += [{**s, "mode": mode} for s in samples]
    ev.end_distributed()
    if rank != 0:
        return
    # ---- outputs ----
    ev.write_json_atomic(os.path.join(out, "samples.jsonl"), all_samples, lines=True)
    protocol = {"model": args.model, "template": args.template, "temperature": temperature,
                "system_prompt": ev.TEMPLATES[args.template][0],
                "user_template": ev.TEMPLATES[args.template][1],
                "sampling_config": args.sampling_config, "top_k": top_k, "top_p": top_p,
                "repetition_penalty": penalty, "max_new_tokens": args.max_new_tokens, "n": args.n,
                "seed": args.seed, "world_size": world,
                "benchmarks": {k: len(v) for k, v in data.items()},
                "dtype": str(ev.resolve_dtype(args.dtype)[0]).replace("torch.", ""),
                "engine": engine, "order": "logits -> update -> repetition penalty -> / T -> top-k "
                "-> top-p -> sample",
                "code": {k: ev.code_protocol(v) for k, v in data.items() if ev.code_protocol(v)}}
    ev.write_json_atomic(os.path.join(out, "results.json"), {
        "metrics": results, "protocol": protocol, "versions": ev.package_versions(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "wall_s": time.time() - t_start, "args": vars(args)})
    print(f"| mode | benchmark | pass@1 | H before (T={temperature:g}) | H after | H before "
          "(T=1) | H after (T=1) | tokens/s |\n" + "|---" * 8 + "|")
    for mode, per in results.items():
        for name, m in per.items():
            print(f"| {mode} | {name} | {m['pass@1']:.1f} | " + " | ".join(
                f"{m[k]:.4g}" if m[k] is not None else "-" for k in ENTROPY_KEYS) +
                f" | {m['tokens_per_s']:.1f} |")
    print(f"wrote {out}/results.json and {out}/samples.jsonl")


if __name__ == "__main__":
    main()

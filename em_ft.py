"""
Entropy-minimization fine-tuning: One-shot EM (Gao et al., arXiv 2505.20282) and EM-FT (Agarwal et al., arXiv
2505.15134). Each optimizer update: sample responses from the current model (no grad, KV-cached batched
generation), then minimize the entropy of the model's next-token distribution softmax(z/T) at the generated
positions. No reward, no labels, no KL. Checkpoints are Hugging Face folders that evaluate.py and vLLM load.

    # One-shot EM on 1 GPU (7B: bf16 model; fp32 master weights + AdamW beside it if they fit, else ~92 GB host RAM)
    python em_ft.py --model Qwen/Qwen2.5-Math-7B --out ckpt/oneshot
    python evaluate.py --model ckpt/oneshot/step_2 --benchmarks math500,amc23,minerva,olympiadbench
    # 8 GPUs: FSDP2, fp32 master weights sharded 8 ways, each rank samples 64/8 rollouts with seed + rank
    torchrun --nproc_per_node=8 em_ft.py --model Qwen/Qwen2.5-Math-7B --out ckpt/oneshot
    # 10 real optimizer updates, checkpoints after 2, 5 and 10, in-training eval on 100 MATH500 problems
    torchrun --nproc_per_node=8 em_ft.py --model Qwen/Qwen2.5-Math-7B --max-steps 10 --save-steps 2,5 --eval-every 1
    # EM-FT (Agarwal et al.): a prompt set, one sample per prompt, trajectory-sum entropy, batch 512, 40 steps
    torchrun --nproc_per_node=8 em_ft.py --recipe em-ft --model Qwen/Qwen2.5-Math-7B --data AI-MO/NuminaMath-CoT
    # CPU smoke run on the tiny random model (offline)
    python tests/tiny_model.py /tmp/tiny && python em_ft.py --model /tmp/tiny --max-steps 3

What "step" means: --max-steps and step_<N> count OPTIMIZER UPDATES of --batch-size rollouts. The released loop's
"step" was one micro-batch of 2 prompts per GPU: its step_10 (8 GPUs, accumulation 4) = our default --max-steps 2.
Recipes (--recipe; any flag given explicitly overrides the recipe): see RECIPES below and papers.md.
Released One-shot EM code vs. here (every other one-shot default is the released value; EM-FT released no code):
  released code                             here (default)                       the released form
  logit at t scores token t (no shift)      it scores token t+1                  none (a fix)
  mask from the non-pad prompt count        each row's own prompt boundary       none (a fix: left padding)
  EOS unscored when it equals the pad id    EOS scored                           none (a fix)
  token mean of each micro-batch (2 roll-   token mean over the whole update     --loss-norm micro-token-mean
    outs), averaged over micro-batches        (all micro-batches and ranks)        --micro-batch-size 2 (tested)
  "step" = 1 micro-batch of 2 per GPU       step = 1 optimizer update            --max-steps 2 = its step_10
  bf16 ZeRO-2, fp32 master + Adam on CPU    1 GPU: on it if they fit, else CPU   --[no-]offload-optimizer
                                            torchrun: FSDP2, fp32 sharded        -
Left out: LoRA, sequence packing, vLLM rollouts, resuming the optimizer state (checkpoints hold weights only).
Outputs in --out: step_<N>/ (safetensors + tokenizer + train_args.json), log.jsonl (one line per update and per
checkpoint written; a rerun into the same --out starts a new log and keeps the last one as log.prev.jsonl).
"""
import argparse, itertools, json, os, random, resource, shutil, types
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from evaluate import (EvalError, build_prompt, compute_metrics, evaluate_model, generate_batch,
                      length_sorted_batches, load_benchmark, load_model, package_versions, write_json_atomic)
from evaluate import MasterAdamW, PhaseTimer, host_rss_gb, master_placement
import evaluate as ev  # the CLI helpers: argparse number types, cli_main, check_out_dir, open_log, check_finite

# One-shot EM's training prompt pi_1 (row 124 of the DeepScaleR subset; gold 12.8, never used by EM).
PI1 = ("The pressure \\( P \\) exerted by wind on a sail varies jointly as the area \\( A \\) of the sail and the "
       "cube of the wind's velocity \\( V \\). When the velocity is \\( 8 \\) miles per hour, the pressure on a sail "
       "of \\( 2 \\) square feet is \\( 4 \\) pounds. Find the wind velocity when the pressure on \\( 4 \\) square "
       "feet of sail is \\( 32 \\) pounds.")
RECIPES = {
    # Gao et al.'s released code: pi_1 only, chat template with the bare problem, 64 rollouts per update.
    "one-shot": dict(template="chat", batch_size=64, max_new_tokens=512, temperature=0.5, top_p=0.95,
                     repetition_penalty=1.15, loss_temperature=0.5, loss_norm="token-mean", lr=2e-5, max_steps=2,
                     eval_template="qwen-math"),
    # Agarwal et al. EM-FT: batch 512 prompts x 1 sample, sequence 4096 (prompt <= 1024 + 3072 new tokens), no
    # loss temperature, 40 steps, their prompt. Not stated in the paper, our choice: lr 1e-6 (their RL runs) and
    # plain sampling at T=1 (their RL rollouts).
    "em-ft": dict(template="agarwal", batch_size=512, max_new_tokens=3072, temperature=1.0, top_p=1.0,
                  repetition_penalty=1.0, loss_temperature=1.0, loss_norm="trajectory-sum", lr=1e-6, max_steps=40,
                  eval_template="agarwal"),
}


# ---- method: entropy minimization (One-shot EM / EM-FT) ----
def token_entropy(h, lm_head, T):
    """Entropy of softmax(lm_head(h) / T) for a chunk of positions: [n, hidden] -> [n], computed in fp32."""
    logp = torch.log_softmax(lm_head(h).float() / T, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_entropy(model, ids, attn, resp, T, chunk):
    """Per-row sums of token entropies over the response positions, and per-row response token counts."""
    # Left padding: positions count from each row's first real token, as in generate() (RoPE only sees relative
    # positions, so this matters for models with absolute positions).
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    h = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    # The logit at position t predicts token t+1: score t iff token t+1 is a response token. This keeps the
    # distribution that produced the first response token (at the last prompt position) and the one that produced
    # EOS, and skips the one after the last token. resp comes from each row's own prompt boundary, never a count.
    target = resp[:, 1:]
    h = h[:, :-1][target]  # [response tokens, hidden]: logits only where they are scored
    # Chunks of positions, each under checkpoint: one chunk's [n, vocab] fp32 logits are alive at a time, and
    # backward recomputes them instead of storing them (152k vocab x 4 bytes = 0.6 MB per position).
    ent = torch.cat([checkpoint(token_entropy, h[i:i + chunk], model.lm_head, T, use_reentrant=False)
                     for i in range(0, len(h), chunk)])
    return torch.zeros(len(ids), device=ent.device).index_add(0, target.nonzero()[:, 0], ent), target.sum(1)


def loss_normalizer(n_tokens, n_trajectories, loss_norm):
    """loss = (sum of token entropies of this micro-batch) / normalizer, with counts of the WHOLE effective batch
    (all micro-batches, all ranks), so the accumulated gradient does not depend on how the batch is split.
    token-mean (One-shot EM): every generated token weighs the same and the loss is a per-token entropy whatever
    the response length, the scale lr 2e-5 was tuned for. trajectory-sum (EM-FT): the sum over a response is an
    estimate of the entropy of the whole response, H(y|x), the quantity Agarwal et al. minimize; longer responses
    weigh more and the loss grows with length, one reason for their small lr. micro-token-mean (the released One-shot
    EM loop's formula; its micro-batch was one generate call of 2 prompts per GPU: --micro-batch-size 2): None = each
    micro-batch's own token mean, averaged over all micro-batches of the update (all ranks); the micro-batches are
    consecutive rollouts in sampling order, and a token weighs 1/(tokens of its micro-batch): short pairs count more."""
    return {"token-mean": n_tokens, "trajectory-sum": n_trajectories}.get(loss_norm)
# ---- end method ----


def sample_rollouts(model, tokenizer, prompts, lengths, args, seed):
    """One response per prompt from the current model, in as few KV-cached generate calls as
    --rollout-batch-size allows (prompts sorted by length: little padding)."""
    model.eval()
    out = [None] * len(prompts)
    for c, idx in enumerate(length_sorted_batches(lengths, args.rollout_batch_size)):
        res = generate_batch(model, tokenizer, [prompts[i] for i in idx], args.max_new_tokens, args.temperature,
                             args.top_p, seed=seed if c == 0 else None, repetition_penalty=args.repetition_penalty,
                             engine=args.engine)
        for i, r in zip(idx, res):
            out[i] = r
    model.train()
    return out


def set_gathered(model, fsdp, on):
    """FSDP2: gather the full parameters now and keep them (on), or reshard them now (off); no-op otherwise.
    Collective, called by every rank at the same point; in between, each rank runs forwards on its own (generate's
    uneven step counts, an eval share of its own) with no collective at all."""
    for m in model.modules() if fsdp else []:
        if hasattr(m, "set_reshard_after_forward"):  # the fully_shard-ed modules
            if m is not model:  # FSDP2 never reshards the root after forward (backward needs it at once): leave it
                m.set_reshard_after_forward(not on, recurse=False)
            m.unshard() if on else m.reshard()


def pack(rows, pad_id, device):
    """Left-pad (prompt ids, response ids) rows into one batch; resp marks each row's response tokens (EOS
    included: generate_batch cuts after the first stop token, so no pad after EOS is ever scored)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, width - len(p) - len(r):] = torch.tensor(p + r)
        attn[i, width - len(p) - len(r):] = 1
        resp[i, width - len(r):] = True
    return ids.to(device), attn.to(device), resp.to(device)


def accumulate_gradients(model, rows, pad_id, args, normalizer, scale=1.0, ctx=nullcontext()):
    """Forward/backward over micro-batches of rows; the summed gradients are those of the effective batch's loss.
    Returns this rank's summed token entropy and its share of the loss (shares of all ranks add up to the loss)."""
    device, total = next(model.parameters()).device, 0.0  # total stays a device tensor: no sync per micro-batch
    # normalizer None (the released per-micro-batch mean): the grouping is part of the loss, so it is the release's,
    # consecutive rows in sampling order. Otherwise micro-batches of similar length: less padding, same gradient.
    b, n = args.micro_batch_size, len(rows)
    micro = ([range(i, min(i + b, n)) for i in range(0, n, b)] if normalizer is None else
             length_sorted_batches([len(p) + len(r) for p, r in rows], b))
    for idx in micro:
        ids, attn, resp = pack([rows[i] for i in idx], pad_id, device)
        with ctx:
            ent_sum, n_tok = model.response_entropy(ids, attn, resp, args.loss_temperature, args.entropy_chunk)
        # scale = world undoes FSDP's gradient averaging; for the per-micro-batch mean it must stay averaged
        part = ent_sum.sum() / (normalizer if normalizer is not None else n_tok.sum() * len(micro) * scale)
        (part * scale).backward()
        total = total + torch.stack([ent_sum.sum(), part]).detach()
    return total.tolist()


def save_checkpoint(model, tokenizer, args, step, fsdp, rank, world):
    """<out>/step_<N>: safetensors + tokenizer + train_args.json, written to step_<N>.tmp then renamed."""
    state = None
    if fsdp:  # collective: every rank sends its shards, rank 0 gets the full state dict on the CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.cuda.is_available():  # same dtype as the single-GPU path (and the released model)
            state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    if rank != 0:
        return
    final = os.path.join(args.out, f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a stale half-written .tmp of a crashed run
    model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "train_args.json"), {"args": vars(args), "seed": args.seed, "step": step,
                                                             "world_size": world, "versions": package_versions()})
    shutil.rmtree(final, ignore_errors=True)  # os.replace cannot replace a non-empty folder (rerun into --out)
    os.replace(tmp, final)


def main(argv=None):
    p = argparse.ArgumentParser(description="Entropy-minimization fine-tuning (One-shot EM, EM-FT).")
    # --- recipe and data (None = the recipe's value, see RECIPES)
    p.add_argument("--recipe", default="one-shot", choices=list(RECIPES), help="defaults of One-shot EM or EM-FT")
    p.add_argument("--model", required=True, help="hub id or local folder of a causal LM")
    p.add_argument("--data", default=None, help="prompt set: .json/.jsonl/.parquet or hub dataset id with a problem "
                   "column (one-shot default: the embedded wind-pressure prompt pi_1; required for em-ft)")
    p.add_argument("--problem-key", default=None, help="problem column of --data (default: problem/question/...)")
    p.add_argument("--template", default=None, choices=list(ev.TEMPLATES), help="prompt format (one-shot: chat = "
                   "bare problem with the model's default system prompt; em-ft: agarwal)")
    # --- rollouts
    p.add_argument("--batch-size", type=ev.pos_int, default=None, help="rollouts per optimizer update, 1 per prompt "
                   "row, over all ranks (one-shot 64, em-ft 512)")
    p.add_argument("--max-new-tokens", type=ev.pos_int, default=None, help="response budget (one-shot 512, em-ft 3072)")
    p.add_argument("--temperature", type=ev.nonneg_float, default=None, help="rollout sampling temperature (0.5 / 1.0)")
    p.add_argument("--top-p", type=ev.unit_float, default=None, help="rollout nucleus sampling (0.95 / 1.0)")
    p.add_argument("--repetition-penalty", type=ev.pos_float, default=None, help="rollout repetition penalty (1.15/1)")
    p.add_argument("--rollout-batch-size", type=ev.pos_int, default=64, help="sequences per generate call (memory)")
    p.add_argument("--engine", default="auto", choices=["auto", "continuous", "static"], help="generation engine")
    # --- loss
    p.add_argument("--loss-temperature", type=ev.pos_float, help="T in softmax(z/T) (one-shot 0.5, em-ft 1)")
    p.add_argument("--loss-norm", default=None, choices=["token-mean", "trajectory-sum", "micro-token-mean"],
                   help="normalization over the effective batch (one-shot token-mean, em-ft trajectory-sum; "
                   "micro-token-mean = the released mean per micro-batch, whose size is then in the loss: 2 there)")
    p.add_argument("--entropy-chunk", type=ev.pos_int, default=1024, help="positions per logits chunk (memory)")
    # --- optimizer
    p.add_argument("--max-steps", type=ev.pos_int, help="optimizer updates (2 = paper's step_10; em-ft 40)")
    p.add_argument("--lr", type=ev.pos_float, help="AdamW learning rate, constant (one-shot 2e-5, em-ft 1e-6)")
    p.add_argument("--weight-decay", type=ev.nonneg_float, default=0.01, help="AdamW weight decay")
    p.add_argument("--betas", type=ev.unit_open, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    p.add_argument("--eps", type=ev.pos_float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--grad-clip", type=ev.pos_float, default=1.0, help="max global gradient norm")
    p.add_argument("--micro-batch-size", type=ev.pos_int, default=8, help="sequences per fwd/bwd (see --loss-norm)")
    p.add_argument("--seed", type=ev.seed_int, default=15, help="seed (the paper's 15; results are seed-sensitive)")
    # --- evaluation and early stopping
    p.add_argument("--eval-every", type=ev.nonneg_int, default=0, help="evaluate at 0 and every N updates (0: off)")
    p.add_argument("--eval-benchmark", default="math500", help="benchmark name or file for --eval-every")
    p.add_argument("--eval-limit", type=ev.pos_int, default=100, help="first N problems of --eval-benchmark")
    p.add_argument("--eval-max-new-tokens", type=ev.pos_int, default=3072, help="eval generation budget (greedy)")
    p.add_argument("--eval-template", default=None, choices=list(ev.TEMPLATES), help="eval prompt (one-shot "
                   "qwen-math, em-ft agarwal)")
    p.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files ($EM_DATA_DIR)")
    p.add_argument("--stop-entropy", type=ev.nonneg_float, default=None, help="stop once the mean token entropy is < X")
    p.add_argument("--stop-entropy-drop", type=ev.unit_float, help="stop once it fell by this fraction (0.5)")
    # --- checkpoints and system
    p.add_argument("--out", default="em_ft_out", help="output folder")
    p.add_argument("--log-rollouts", action="store_true", help="append every rollout to <out>/rollouts.jsonl")
    p.add_argument("--save-steps", type=ev.step_list, default="", help="comma list of updates to save (+ the last)")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None, help="fp32 master "
                   "weights + AdamW on the CPU; default on 1 GPU: on the GPU if they fit beside the bf16 model")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute layer activations in backward (default: on for CUDA)")
    args = p.parse_args(argv)
    for k, v in RECIPES[args.recipe].items():  # the recipe fills only what the command line left unset
        if getattr(args, k) is None:
            setattr(args, k, v)
    ev.cli_main(train, args, resumes=False)


def train(args):
    # ---------------------------------------------------------------- setup
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if args.batch_size % world:
        raise EvalError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    if args.recipe == "em-ft" and not args.data:
        raise EvalError("--recipe em-ft needs --data (a prompt set with a problem column)")
    save_steps = set(args.save_steps) | {args.max_steps}  # (argparse has checked every number's range)
    if max(save_steps) > args.max_steps:
        raise EvalError(f"--save-steps {max(save_steps)} is past --max-steps {args.max_steps}: it would never be saved")
    ev.check_out_dir(args.out)  # before the model loads
    fsdp = world > 1
    fp32_master = args.offload_optimizer or (cuda and not fsdp)  # bf16 model + fp32 master (on GPU or CPU)
    if fp32_master and fsdp:
        raise EvalError("--offload-optimizer is for one process; under torchrun FSDP2 shards the fp32 state")
    if fsdp:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # ---------------------------------------------------------------- data
    problems = [p["problem"] for p in load_benchmark(args.data, problem_key=args.problem_key,
                                                     require_answer=False)] if args.data else [PI1]
    eval_set = load_benchmark(args.eval_benchmark, args.data_dir, limit=args.eval_limit) if args.eval_every else None

    # ---------------------------------------------------------------- model
    # Precision (memory plan for 7.6B params on one 80 GB GPU). bf16 keeps 8 significant bits, so a weight w only
    # moves if |update| > ~|w| * 2^-9 ~ 2e-3 |w|. AdamW's first updates are ~lr = 2e-5 (1e-6 for EM-FT) per weight,
    # and typical |w| is 1e-2..1e-1: relative updates of 2e-4..2e-3 (1e-5..1e-4 at lr 1e-6), below half a bf16 ulp: in
    # pure bf16 most updates round to nothing. Hence fp32 master weights. Single GPU: bf16 weights (15 GB) + bf16
    # grads (15 GB) + checkpointed activations on the GPU; fp32 master (30 GB) + AdamW m, v (61 GB) there too if
    # they fit (an H200), else on the CPU (an 80 GB GPU). The bf16 grads sum the micro-batches with bf16 rounding:
    # on the tiny model, 8 micro-batches, 0.3% relative gradient error and 99.95% of signs kept (Adam's first
    # updates are ~lr * sign(g)), a quarter of what bf16 compute itself costs; fp32 sums in place of the bf16 grads
    # would take 15 GB more GPU memory. torchrun: FSDP2 with fp32 params sharded N ways, bf16 compute, fp32
    # gradient reduction. CPU: plain fp32 model and AdamW.
    model, tokenizer = load_model(args.model, "bfloat16" if cuda and fp32_master else "float32")
    prompts = [build_prompt(tokenizer, q, args.template) for q in problems]
    lengths = [len(tokenizer(q, add_special_tokens=False).input_ids) for q in prompts]
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    keep = [i for i, n in enumerate(lengths) if n + args.max_new_tokens <= context]
    if not keep:
        raise EvalError(f"no prompt fits: {min(lengths)}+ prompt tokens + --max-new-tokens {args.max_new_tokens} > "
                        f"the model's context of {context}")
    if len(keep) < len(prompts) and rank == 0:
        print(f"dropped {len(prompts) - len(keep)} prompts longer than the context minus --max-new-tokens")
    prompts = [prompts[i] for i in keep]
    prompt_ids = [tokenizer(q, add_special_tokens=False).input_ids for q in prompts]
    if args.gradient_checkpointing if args.gradient_checkpointing is not None else cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Bind the method as model.response_entropy so FSDP can treat it as a forward (gathers the root's parameters:
    # embeddings, final norm, lm_head, tied or not).
    model.response_entropy = types.MethodType(response_entropy, model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        for layer in model.model.layers:
            fully_shard(layer, **({"mp_policy": mp} if mp else {}))
        fully_shard(model, **({"mp_policy": mp} if mp else {}))
        register_fsdp_forward_method(model, "response_entropy")

    # ---------------------------------------------------------------- optimizer
    params = [q for q in model.parameters() if q.requires_grad]
    where = master_placement(params, args.offload_optimizer, rank == 0) if fp32_master else None  # GPU or CPU
    optimizer = MasterAdamW(params, where, lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.weight_decay)

    # ---------------------------------------------------------------- loop
    rng = random.Random(args.seed)  # same on every rank: all ranks agree on the global batch of prompt rows
    stream = itertools.chain.from_iterable(rng.sample(range(len(prompts)), len(prompts)) for _ in itertools.count())
    per_rank = args.batch_size // world
    log = ev.open_log(args.out, "rollouts.jsonl") if rank == 0 else None  # this run's steps only (rerun)

    def run_eval(step):
        model.eval()  # HF turns the KV cache off under gradient checkpointing in train mode
        set_gathered(model, fsdp, True)
        mine = eval_set[rank::world]  # each rank grades its share; metrics over the gathered samples
        samples = evaluate_model(model, tokenizer, mine, args.eval_template, args.eval_max_new_tokens,
                                 batch_size=args.rollout_batch_size, seed=args.seed, name=args.eval_benchmark,
                                 progress=rank == 0, engine=args.engine)[1] if mine else []
        set_gathered(model, fsdp, False)
        model.train()
        if fsdp:
            parts = [None] * world
            dist.all_gather_object(parts, samples)
            samples = [x for part in parts for x in part]
        m = compute_metrics(samples, 1)
        if rank == 0:
            tqdm.write(f"eval step {step}: {args.eval_benchmark} pass@1 {m['pass@1']:.1f} (n={m['problems']})")
            log.write(json.dumps({"step": step, f"eval_{args.eval_benchmark}": m["pass@1"],
                                  "eval_problems": m["problems"]}) + "\n")
            log.flush()

    if args.eval_every:
        run_eval(0)
    first_entropy, warned = None, False  # the first update's entropy, for --stop-entropy-drop
    for step in tqdm(range(1, args.max_steps + 1), desc="em_ft", disable=rank != 0, dynamic_ncols=True):
        timer = PhaseTimer(cuda)  # rollout, fwd_bwd, grad, adamw, copyback: seconds in the log line
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        batch = list(itertools.islice(stream, args.batch_size))[rank * per_rank:(rank + 1) * per_rank]
        # Each rank samples its own share with its own seed (seed + rank at the first update). Under FSDP the
        # gathered bf16 weights stay put during generation instead of being re-gathered at every decoding step.
        set_gathered(model, fsdp, True)
        outs = sample_rollouts(model, tokenizer, [prompts[i] for i in batch], [len(prompt_ids[i]) for i in batch],
                               args, seed=args.seed + rank + world * (step - 1))
        set_gathered(model, fsdp, False)
        rows = [(prompt_ids[i], o["ids"]) for i, o in zip(batch, outs)]
        timer.mark("rollout")
        if args.log_rollouts:  # every rollout of the update, gathered on rank 0 in rank order
            recs = [{"step": step, "rank": rank, "prompt": prompts[i], "response": o["text"], "ids": o["ids"],
                     "truncated": o["truncated"]} for i, o in zip(batch, outs)]
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(recs, gathered) if fsdp else None
            if rank == 0:
                with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
                    f.writelines(json.dumps(r) + "\n" for g in (gathered if fsdp else [recs]) for r in g)
        # Sync point: global counts before any backward, so every rank divides by the same normalizer.
        counts = torch.tensor([sum(len(r) for _, r in rows), len(rows), sum(o["truncated"] for o in outs),
                               sum(len(q) + len(r) for q, r in rows)], dtype=torch.float64)
        if fsdp:
            dist.all_reduce(counts)
        n_tok, n_traj, n_trunc, n_seq_tok = counts.tolist()
        if n_trunc > n_traj / 2 and rank == 0 and not warned:  # once, rank 0
            warned = True
            tqdm.write(f"warning: {n_trunc / n_traj:.0%} of the rollouts of update {step} hit --max-new-tokens "
                       f"{args.max_new_tokens} (cut before EOS, which is then never scored); consider raising it")
        # FSDP averages gradients over ranks; the loss is already divided by the global count, so scale by world.
        ent, loss = accumulate_gradients(model, rows, tokenizer.pad_token_id, args,
                                         loss_normalizer(n_tok, n_traj, args.loss_norm), world, ctx)
        timer.mark("fwd_bwd")
        norm = optimizer.step(args.grad_clip, timer)  # clip, AdamW, grads set to None
        ent = torch.tensor([ent, loss], dtype=torch.float64)
        if fsdp:
            dist.all_reduce(ent)
        sec, (ent, loss) = timer.seconds(), ent.tolist()
        entropy = ent / n_tok  # mean token entropy of this update's rollouts, before the update
        stats = {"step": step, "loss": loss,
                 "entropy": entropy,
                 "grad_norm": norm.item(), "response_length": n_tok / n_traj, "truncated": n_trunc / n_traj,
                 "rollout_tok_s": n_tok / sec["rollout_s"],
                 "train_tok_s": n_seq_tok / (sec["step_s"] - sec["rollout_s"]), **sec,
                 "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_rss_gb": host_rss_gb()}  # KiB
        if rank == 0:
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
            log.write(json.dumps(stats) + "\n")
            log.flush()
        ev.check_finite(step, loss=stats["loss"], grad_norm=stats["grad_norm"])  # before anything is saved
        first_entropy = entropy if first_entropy is None else first_entropy
        stop = (args.stop_entropy is not None and entropy < args.stop_entropy) or (
            args.stop_entropy_drop is not None and entropy <= (1 - args.stop_entropy_drop) * first_entropy)
        if args.eval_every and step % args.eval_every == 0:
            run_eval(step)
        if step in save_steps or stop:
            save_checkpoint(model, tokenizer, args, step, fsdp, rank, world)
            if rank == 0:  # the log lists the checkpoints that exist
                print(json.dumps({"step": step, "checkpoint": f"step_{step}"}), file=log, flush=True)
        if stop and rank == 0:
            tqdm.write(f"early stop at step {step}: entropy {entropy:.4f}")
        if stop:
            break
    if fsdp:
        dist.barrier()  # rank 0 may still be writing: tearing gloo down under it can abort a rank at exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

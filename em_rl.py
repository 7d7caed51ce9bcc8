r"""
em_rl.py -- EM-RL (Agarwal et al., arXiv 2505.15134): on-policy RL whose ONLY reward is the model's confidence
in its own sampled response. No labels.

    --reward token           r(y) = -sum_t H(pi(.|x,y_<t))        EM-RL-token (the paper's best math row)
    --reward sequence        r(y) =  sum_t log pi(y_t|x,y_<t)     EM-RL-sequence (E[r] = -trajectory entropy)
    --reward self-certainty  r(y) =  mean_t KL(U || pi(.|x,y_<t))  Intuitor's reward, a label-free neighbour

Each step: sample --n-rollouts responses (T=1) for each of --batch-size prompts, all n of a prompt in one KV-cached
generate call; ONE no-grad forward gives the old log-probs, entropies and rewards; leave-one-out baseline within each
prompt's group; PPO-clip over --ppo-minibatches mini-batches with a k3 KL to the frozen initial model and a small
entropy bonus. Logged per step: reward, entropy, length, truncation, accuracy and reward/correctness correlation
(when the prompts have answers), and the failure modes (repetition spam, length collapse).

Paper vs released code (../shared/papers.md section 2): the paper writes sums over tokens and a REINFORCE/RLOO
update with a 0.001 KL; the code behind its Table 2 used length-normalized means, PPO-clip (0.2, 4 mini-batches,
1 epoch), a 0.001 k3 KL and verl's +0.001 entropy bonus. Defaults follow the code (it made the published
numbers); the paper's form is `--reward-agg sum --update reinforce --entropy-bonus 0 --loss-agg seq-mean-token-sum`.

    # 1 GPU (80 GB): bf16 policy + bf16 frozen reference on the GPU, fp32 master weights + AdamW on the CPU
    # (~100 GB of CPU RAM for a 7B); the paper trained on 35K NuminaMath problems
    python em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl --reward token --out checkpoints/em_rl_token
    # 8 GPUs: FSDP2, fp32 master weights and AdamW state sharded 8 ways
    torchrun --nproc_per_node=8 em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl --reward token
    # CPU smoke run on the tiny random model (offline, seconds)
    python tests/tiny_model.py /tmp/tiny
    python em_rl.py --model /tmp/tiny --data ../shared/benchmarks/gsm8k.jsonl --limit 8 --batch-size 4 \
        --max-new-tokens 48 --steps 3 --lr 1e-3 --kl-coef 0.01 --save-steps 1 --out /tmp/em_rl_smoke

Output: <out>/step_<N>/ (HF folder + train_args.json; N counts rollout steps, each --ppo-minibatches optimizer
updates), <out>/log.jsonl. Left out: vLLM rollouts (HF generate + KV cache instead), early stopping on a validation
split (use --eval-every, pick a checkpoint), sequence packing, the paper's code-generation runs.
"""
import argparse, json, math, os, resource, shutil, statistics, sys, time, zlib
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import evaluate as ev


# ---- method: EM-RL rewards and baselines (everything here runs without grad) ----
def logit_stats(logits, targets):
    """Per position, from full-vocabulary logits [N, V] at temperature 1: log pi(target), the entropy
    H = -sum_v pi_v log pi_v, and Intuitor's self-certainty KL(U || pi) = -log V - (1/V) sum_v log pi_v."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # fp32: bf16 log-probs are too coarse to rank responses
    entropy = -(logp.exp() * logp).sum(-1)
    certainty = -math.log(logp.shape[-1]) - logp.mean(-1)
    return logp.gather(-1, targets[:, None])[:, 0], entropy, certainty


def em_rewards(logp, entropy, certainty, row, n_rows, kind, agg):
    """One reward per response from the stats of its tokens (row[i] = the response token i belongs to)."""
    per_token = {"sequence": logp, "token": -entropy, "self-certainty": certainty}[kind].detach()
    total = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add_(0, row, per_token)
    if agg == "sum":  # the paper's formulas; a sum of negative terms (sequence, token) also rewards being SHORT
        return total
    # The released code (it made the published numbers) length-normalizes: no pull on the length.
    return total / torch.bincount(row, minlength=n_rows).clamp(min=1)


def group_advantages(rewards, n, baseline):
    """Rewards of consecutive groups of n responses to one prompt -> one advantage per response."""
    r = rewards.view(-1, n)
    if baseline == "rloo":  # leave-one-out: r_i - mean of the other n-1 responses (unbiased, no critic)
        return (r - (r.sum(1, keepdim=True) - r) / (n - 1)).flatten()
    # GRPO: standardize within the group (unbiased std, as verl); eps keeps a group of equal rewards at 0
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).flatten()
# ---- end method ----


# ---- the policy-gradient update (standard RL machinery, as in verl) ----
def k3_kl(ref_logp, logp):
    """Schulman's k3 estimate of KL(pi || ref) at tokens sampled from pi: exp(r) - r - 1, r = ref - logp.
    Non-negative and low-variance; clamped like verl's low_var_kl so one wild token cannot blow up the step."""
    r = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(r) - r - 1).clamp(-10, 10)


def policy_loss(logp, old_logp, adv, args):
    """Per-token policy-gradient term; the caller sums tokens and divides by the global token count."""
    if args.update == "reinforce":  # the paper: REINFORCE with the RLOO baseline, strictly on-policy
        return -adv * logp
    ratio = torch.exp(logp - old_logp)  # 1 on the first mini-batch; later ones are slightly off-policy
    clipped = ratio.clamp(1 - args.clip_ratio, 1 + args.clip_ratio)
    return -torch.min(ratio * adv, clipped * adv)  # pessimistic bound: no gain from moving past the clip


def response_stats(model, ids, attn, resp, chunk=1024, grad=False):
    """(log pi(y_t), H_t, KL(U||pi_t), row) for every response token of a padded batch, from ONE forward of the
    base model. The vocabulary projection runs over chunks of positions, so [tokens x vocab] fp32 logits never
    exist at once; with grad each chunk is checkpointed (backward recomputes its logits instead of storing them)."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in generate (RoPE would not
    # mind a constant shift, absolute position embeddings would)
    h = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    sel = resp[:, 1:]  # shift by one: the state at t predicts token t+1, so response token t reads state t-1
    h, targets, row = h[:, :-1][sel], ids[:, 1:][sel], sel.nonzero()[:, 0]  # only response positions get logits

    def stats(h_chunk, t_chunk):
        return logit_stats(model.lm_head(h_chunk), t_chunk)
    out = [checkpoint(stats, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False) if grad
           else stats(h[i:i + chunk], targets[i:i + chunk]) for i in range(0, len(h), chunk)]
    return (*(torch.cat(x) for x in zip(*out)), row)


def pad_batch(prompts, responses, pad_id, device):
    """[pads | prompt | response | pads]: prompts left-padded as generate saw them, responses right-padded.
    resp marks the response tokens, the stop token included; pads and prompt are out of every loss."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P + len(r)] = torch.tensor(p + r)
        attn[i, P - len(p):P + len(r)] = 1
        resp[i, P:P + len(r)] = True
    return ids.to(device), attn.to(device), resp.to(device)


def repeat_share(ids, n=4):
    """Share of a response's n-grams that repeat an earlier one: near 1 = the same phrase looped (spam)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def pearson(x, y):
    """Pearson correlation (point-biserial when y is 0/1); nan when either side is constant."""
    try:
        return statistics.correlation([float(v) for v in x], [float(v) for v in y])
    except statistics.StatisticsError:
        return float("nan")


def offloaded_step(params, master, optimizer, grad_clip):
    """AdamW on fp32 CPU master weights for a bf16 GPU model (same as em_ft.py). Clip on the GPU (the norm needs
    every gradient), then stream gradients to the CPU a group at a time: AdamW skips parameters whose .grad is None
    and keeps a step count per parameter, so stepping group by group is one AdamW step with one group's fp32 grads
    on the CPU (all 7B grads at once would be 30 GB more host RAM)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for start in range(0, len(params), 16):
        group = range(start, min(start + 16, len(params)))
        for i in group:
            master[i].grad = None if params[i].grad is None else params[i].grad.to("cpu", torch.float32)
            params[i].grad = None
        optimizer.step()
        for i in group:
            master[i].grad = None
            params[i].data.copy_(master[i], non_blocking=True)  # fp32 -> bf16 rounding happens here only
    return norm


def main(argv=None):
    p = argparse.ArgumentParser(description="EM-RL: RL with the model's own negative entropy as the only reward.")
    # --- model and data
    p.add_argument("--model", default="Qwen/Qwen2.5-Math-7B", help="hub id or local folder (paper: Qwen2.5-Math-7B)")
    p.add_argument("--data", required=True, help="training prompts: .json/.jsonl/.parquet file or hub dataset id "
                   "(paper: 35K NuminaMath problems); answers are optional, used only for logging")
    p.add_argument("--problem-key", default=None, help="problem column (default: problem/question/prompt/input)")
    p.add_argument("--answer-key", default=None, help="answer column, for accuracy logs only (default: auto)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--template", default="agarwal", choices=list(ev.TEMPLATES), help="prompt format (paper: agarwal)")
    # --- rollouts
    p.add_argument("--batch-size", type=int, default=512, help="prompts per step, all ranks together (paper: 512)")
    p.add_argument("--n-rollouts", type=int, default=4, help="responses per prompt (paper: 4)")
    p.add_argument("--max-new-tokens", type=int, default=3072, help="response budget (released code: 3072)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (released code: 1.0); "
                   "log-probs and rewards are at T=1, so another value makes the update off-policy")
    p.add_argument("--rollout-batch-size", type=int, default=64, help="sequences per generate call (memory knob)")
    p.add_argument("--engine", default="auto", choices=["auto", "continuous", "static"], help="generation engine")
    # --- reward and advantage
    p.add_argument("--reward", default="token", choices=["token", "sequence", "self-certainty"], help="which "
                   "confidence is the reward: -sum H (token), log pi(y) (sequence), KL(U||pi) (self-certainty)")
    p.add_argument("--reward-agg", default="mean", choices=["mean", "sum"], help="over response tokens; mean = "
                   "released code (made the published numbers), sum = the paper's formula")
    p.add_argument("--baseline", default="rloo", choices=["rloo", "grpo"], help="leave-one-out (paper) or z-score")
    # --- update
    p.add_argument("--update", default="ppo-clip", choices=["ppo-clip", "reinforce"], help="ppo-clip = released "
                   "code; reinforce = the paper's REINFORCE (one update per rollout batch)")
    p.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-sum"], help="loss "
                   "normalizer: every token of the mini-batch (released code, verl's default) or every response "
                   "(REINFORCE's (1/N) sum_i A_i sum_t grad log pi, the paper's form)")
    p.add_argument("--clip-ratio", type=float, default=0.2, help="PPO clip epsilon (released code: 0.2)")
    p.add_argument("--ppo-minibatches", type=int, default=4, help="optimizer updates per rollout batch, 1 epoch")
    p.add_argument("--kl-coef", type=float, default=0.001, help="k3 KL to the frozen initial model (0: no ref model)")
    p.add_argument("--entropy-bonus", type=float, default=0.001, help="verl's default bonus; it RAISES entropy")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate, constant (paper: 1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (verl default)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--steps", type=int, default=100, help="rollout steps (paper: early stop on validation)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward (memory knob)")
    p.add_argument("--logit-chunk", type=int, default=1024, help="positions per chunk of the vocab projection")
    p.add_argument("--seed", type=int, default=0, help="data order and sampling seed (each rank draws its own)")
    # --- system
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, help="fp32 master weights + "
                   "AdamW on the CPU (default: on for a single CUDA GPU)")
    # --- output and evaluation
    p.add_argument("--out", default="checkpoints/em_rl", help="output folder")
    p.add_argument("--save-steps", default="", help="comma list of steps to checkpoint (the last always is)")
    p.add_argument("--log-rollouts", action="store_true", help="append every response (text, ids, reward, "
                   "advantage) to <out>/rollouts.jsonl")
    p.add_argument("--eval-every", type=int, default=0, help="greedy eval every N steps, at 0 and at the end")
    p.add_argument("--eval-benchmark", default="math500", help="evaluate.py benchmark name or file")
    p.add_argument("--eval-limit", type=int, default=100, help="first N problems of the eval benchmark")
    p.add_argument("--eval-max-new-tokens", type=int, default=3072, help="eval generation budget (greedy)")
    p.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files (or Hub)")
    args = p.parse_args(argv)
    try:
        return train(args)
    except ev.EvalError as e:
        sys.exit(f"error: {e}")


def train(args):
    # ---------------------------------------------------------------------------- setup
    if min(args.batch_size, args.max_new_tokens, args.steps, args.micro_batch_size, args.ppo_minibatches,
           args.rollout_batch_size, args.logit_chunk, args.n_rollouts - 1) < 1 or args.temperature <= 0 or \
            args.clip_ratio <= 0 or min(args.lr, args.kl_coef, args.eval_every) < 0:
        raise ev.EvalError("--n-rollouts must be >= 2 (the baseline needs a group), sizes/counts >= 1, --temperature "
                           "and --clip-ratio > 0, --lr/--kl-coef/--eval-every >= 0")
    try:
        save_steps = {int(s) for s in args.save_steps.split(",") if s.strip()} | {args.steps}
    except ValueError:
        raise ev.EvalError(f"--save-steps must be a comma list of integers, got {args.save_steps!r}") from None
    distributed, cuda = int(os.environ.get("WORLD_SIZE", 1)) > 1, torch.cuda.is_available()
    if distributed:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    master, n = rank == 0, args.n_rollouts
    if args.batch_size % world or args.ppo_minibatches > args.batch_size // world * n:
        raise ev.EvalError(f"--batch-size {args.batch_size} must split over the {world} ranks, with at least "
                           "--ppo-minibatches responses per rank")
    offload = cuda and not distributed if args.offload_optimizer is None else args.offload_optimizer
    if offload and distributed:  # (on a CPU it only serves the tests: a bf16 model with an fp32 master copy)
        raise ev.EvalError("--offload-optimizer is for a single process; torchrun shards with FSDP2 instead")
    device = torch.device("cuda" if cuda else "cpu")
    ctx = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()

    # ---------------------------------------------------------------------------- data
    problems = ev.load_benchmark(args.data, args.data_dir, args.problem_key, args.answer_key, limit=args.limit,
                                 require_answer=False)
    eval_set = ev.load_benchmark(args.eval_benchmark, args.data_dir, limit=args.eval_limit) if args.eval_every else []

    # ---------------------------------------------------------------------------- model
    # Memory plan, 7.6B on one 80 GB GPU. bf16 keeps 8 significant bits: a weight w moves only if the update
    # exceeds ~|w|*2^-9 ~ 2e-3|w|; at lr 1e-6 Adam's first updates are ~1e-6 against |w| ~ 1e-2..1e-1 (1e-5..1e-4
    # relative), so pure-bf16 training would round almost every update to nothing. Hence fp32 master weights:
    # GPU: bf16 policy 15 GB + bf16 grads 15 GB + frozen bf16 reference for the KL 15 GB + activations (gradient
    # checkpointing, chunked logits: a few GB per micro-batch of 4 x 3.3K tokens) + the rollout KV cache (57 KB per
    # token: 64 sequences x 3.3K tokens = 12 GB) ~ 65 GB. CPU (--offload-optimizer): fp32 master 30 GB + AdamW
    # moments 60 GB. torchrun: FSDP2 shards fp32 params/grads/moments N ways (bf16 compute, fp32 gradient
    # reduction); each rank keeps a full bf16 reference (15 GB). CPU: plain fp32 model and AdamW.
    model, tok = ev.load_model(args.model, "bfloat16" if offload else "float32")
    texts = [ev.build_prompt(tok, q["problem"], args.template) for q in problems]
    prompt_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max(map(len, prompt_ids)) >= context:
        raise ev.EvalError(f"a prompt of {max(map(len, prompt_ids))} tokens does not fit the context of {context}")
    if context and max(map(len, prompt_ids)) + args.max_new_tokens > context and rank == 0:
        print(f"warning: prompt ({max(map(len, prompt_ids))} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
              f"the model's context of {context}; long responses run past the trained positions")
    ref = ev.load_model(args.model)[0].eval().requires_grad_(False) if args.kl_coef > 0 else None
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and cuda):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stats_fn, fsdp_modules = partial(response_stats, model), []
    if distributed:  # FSDP2 (runs on CPU/gloo too, which is how the tests exercise this path)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        # FSDP2 gathers the root's params (embeddings, norm, lm_head) only around forward(): register our entry.
        model.response_stats = stats_fn
        register_fsdp_forward_method(model, "response_stats")
        stats_fn, fsdp_modules = model.response_stats, [m for m in model.modules() if isinstance(m, FSDPModule)]
    params = [q for q in model.parameters() if q.requires_grad]
    master_params = [q.detach().float().cpu().requires_grad_() for q in params] if offload else params
    opt = torch.optim.AdamW(master_params, lr=args.lr, weight_decay=args.weight_decay, foreach=True)

    def gather_weights(full):  # hold full (bf16) weights so generate's uneven step counts need no collectives
        for m in fsdp_modules:
            if m is not model:  # the root never reshards after forward (FSDP2's own choice): leave it so
                m.set_reshard_after_forward(not full, recurse=False)
            m.unshard() if full else m.reshard()

    def gather(obj):  # python objects of every rank -> one list on every rank (logs, eval samples)
        if not distributed:
            return list(obj)
        out = [None] * world
        dist.all_gather_object(out, list(obj))
        return [x for part in out for x in part]

    def evaluate():
        model.eval()  # eval mode: HF turns the KV cache off under gradient checkpointing in train mode
        gather_weights(True)
        mine = eval_set[rank::world]  # each rank grades its share; metrics over the gathered samples
        with ctx:
            samples = ev.evaluate_model(model, tok, mine, args.template, args.eval_max_new_tokens, engine=args.engine,
                                        name=args.eval_benchmark, progress=master)[1] if mine else []
        gather_weights(False)
        return {f"eval_{k}": v for k, v in ev.compute_metrics(gather(samples), 1).items()}

    def emit(log):  # one line per step on stdout and in log.jsonl (rank 0); NaN -> null keeps the JSON standard
        if master:
            log = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in log.items()}
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items()))
            log_file.write(json.dumps(log) + "\n")
            log_file.flush()

    def save(step, updates):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
            if distributed else model.state_dict()  # FSDP: gather the full state dict; only rank 0 writes it
        if master:  # write step_N.tmp, then rename: a crash never leaves a half-written step_N
            final = os.path.join(args.out, f"step_{step}")
            shutil.rmtree(final + ".tmp", ignore_errors=True)
            sd = {k: v.to(torch.bfloat16 if cuda else v.dtype) for k, v in sd.items()}  # bf16 on GPU: what vLLM loads
            if getattr(model.config, "tie_word_embeddings", False):  # FSDP's full state dict holds a 2nd copy
                sd.pop("lm_head.weight", None)
            model.save_pretrained(final + ".tmp", state_dict=sd)
            tok.save_pretrained(final + ".tmp")
            ev.write_json_atomic(os.path.join(final + ".tmp", "train_args.json"), {
                "args": vars(args), "seed": args.seed, "step": step, "optimizer_updates": updates,
                "world_size": world, "versions": ev.package_versions()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(final + ".tmp", final)
        if distributed:
            dist.barrier()

    # ---------------------------------------------------------------------------- loop
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    per_rank, order, first_len, updates = args.batch_size // world, [], None, 0
    if args.eval_every:
        emit({"step": 0, **evaluate()})  # the base model's score, for comparison

    def padded(seqs):  # the rollouts seqs as one [pads | prompt | response | pads] batch
        return pad_batch([prompt_ids[rollouts[s][0]] for s in seqs], [rollouts[s][1]["ids"] for s in seqs],
                         tok.pad_token_id, device)

    def micro_batches(seqs):
        return [seqs[i:i + args.micro_batch_size] for i in range(0, len(seqs), args.micro_batch_size)]

    for step in tqdm(range(1, args.steps + 1), desc="em_rl", disable=not master, dynamic_ncols=True):
        t0 = time.time()
        # -- rollouts. Prompt order: a fresh seeded permutation per epoch, the same on all ranks; each takes a slice.
        while len(order) < step * args.batch_size:
            order += torch.randperm(len(problems), generator=torch.Generator().manual_seed(args.seed + len(order)))
        idx = [int(i) for i in order[(step - 1) * args.batch_size:step * args.batch_size]][rank * per_rank:][:per_rank]
        model.eval()  # HF turns the KV cache off under gradient checkpointing in train mode
        gather_weights(True)
        rollouts, per_call = [], max(1, args.rollout_batch_size // n)
        for c in range(0, len(idx), per_call):  # all n responses of a prompt in one call: the prompt repeated n times
            group = [i for i in idx[c:c + per_call] for _ in range(n)]
            with ctx:
                outs = ev.generate_batch(model, tok, [texts[i] for i in group], args.max_new_tokens, args.temperature,
                                         seed=zlib.crc32(f"{args.seed}/{rank}/{step}/{c}".encode()), engine=args.engine)
            rollouts += zip(group, outs)
        gather_weights(False)
        t_roll = time.time()
        # -- score: ONE no-grad forward per micro-batch gives the old log-probs, the entropies and the reward
        S, lengths = len(rollouts), [len(o["ids"]) for _, o in rollouts]
        old_lp, ref_lp, entropy, rewards = [], [], [], []
        for mb in micro_batches(list(range(S))):
            with torch.no_grad(), ctx:
                lp, ent, cert, row = stats_fn(*padded(mb), args.logit_chunk)
                rewards.append(em_rewards(lp, ent, cert, row, len(mb), args.reward, args.reward_agg))
                old_lp += lp.split([lengths[s] for s in mb])  # per response, in the order the update reads them
                entropy += ent.split([lengths[s] for s in mb])
                if ref is not None:
                    ref_lp += response_stats(ref, *padded(mb), args.logit_chunk)[0].split([lengths[s] for s in mb])
        rewards = torch.cat(rewards)
        adv = group_advantages(rewards, n, args.baseline)  # a prompt's group never straddles ranks: no communication
        t_score = time.time()
        # -- update. Token-mean loss (verl's default): every response token of the mini-batch, on every rank, weighs
        # the same (long responses count more than short ones); seq-mean-token-sum divides by the number of responses
        # instead. The count is all-reduced, so N ranks give exactly the gradient of 1 rank holding the mini-batch.
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kl, clipped tokens, tokens (no sync)
        for mb in torch.arange(S).tensor_split(args.ppo_minibatches if args.update == "ppo-clip" else 1):
            count = torch.tensor(float(sum(lengths[s] for s in mb.tolist()) if args.loss_agg == "token-mean"
                                       else len(mb)), device=device)
            if distributed:
                dist.all_reduce(count)  # sync point: the global token (or response) count of this mini-batch
            for chunk in micro_batches(mb.tolist()):
                with ctx:
                    lp, ent, _, row = stats_fn(*padded(chunk), args.logit_chunk, True)
                old = torch.cat([old_lp[s] for s in chunk])
                a_tok = adv[torch.tensor(chunk, device=device)][row]  # each token gets its response's advantage
                loss = policy_loss(lp, old, a_tok, args)
                loss = loss - args.entropy_bonus * ent  # a BONUS: it raises entropy, against the EM reward (as verl)
                kl = k3_kl(torch.cat([ref_lp[s] for s in chunk]), lp) if ref is not None else torch.zeros_like(lp)
                loss = loss + args.kl_coef * kl
                (loss.sum() / count * world).backward()  # FSDP averages over ranks: undo its 1/world
                ratio = (lp - old).exp()
                # clipped = the clip is active (no gradient): ratio past 1+eps with A > 0, or below 1-eps with A < 0
                clipped = ((ratio > 1 + args.clip_ratio) & (a_tok > 0)) | ((ratio < 1 - args.clip_ratio) & (a_tok < 0))
                sums += torch.stack([loss.sum().detach(), kl.sum().detach(), clipped.sum(), lp.new_tensor(len(lp))])
            if offload:  # the fp32 master step runs on the CPU; bf16 GPU weights only receive its rounded result
                grad_norm = offloaded_step(params, master_params, opt, args.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            opt.zero_grad(set_to_none=True)
            updates += 1
        t_end = time.time()
        # -- logs: per-response records of all ranks; accuracy only when the prompts have answers
        ent_sums = torch.stack([e.sum() for e in entropy]).tolist()  # one host sync, not one per response
        recs = gather((r, a, lengths[s], o["truncated"], e, repeat_share(o["ids"]),
                       None if problems[i]["answer"] is None else ev.is_correct(o["text"], problems[i]["answer"]),
                       {"step": step, "rank": rank, "prompt_index": i, "prompt": texts[i], "response": o["text"],
                        "ids": o["ids"], "reward": r, "advantage": a} if args.log_rollouts else None)
                      for s, ((i, o), r, a, e) in enumerate(zip(rollouts, rewards.tolist(), adv.tolist(), ent_sums)))
        r, a, L, trunc, ent_sum, rep, ok, rolls = zip(*recs)
        if master and args.log_rollouts:  # every response of the step, in rank order (groups of n stay together)
            with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
                f.writelines(json.dumps(x) + "\n" for x in rolls)
        if distributed:
            dist.all_reduce(sums)
        first_len = first_len or sum(L) / len(L)
        mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        log = dict(step=step, updates=updates, loss=(sums[0] / sums[3]).item(), reward=sum(r) / len(r),
                   entropy=sum(ent_sum) / sum(L), length=sum(L) / len(L), length_vs_step1=sum(L) / len(L) / first_len,
                   truncated=sum(trunc) / len(L), spam=sum(x > 0.5 for x in rep) / len(L), repeat=sum(rep) / len(L),
                   kl=(sums[1] / sums[3]).item(), clip_frac=(sums[2] / sums[3]).item(), grad_norm=grad_norm.item(),
                   rollout_tok_s=sum(L) / (t_roll - t0), step_s=t_end - t0, peak_mem_gb=mem / 2**30,
                   train_tok_s=world * sum(len(prompt_ids[i]) + len(o["ids"]) for i, o in rollouts) / (t_end - t_score))
        if None not in ok:  # does the label-free reward agree with the truth? pooled, and within each prompt's group
            centered = [c - sum(ok[j - j % n:j - j % n + n]) / n for j, c in enumerate(ok)]
            log.update(accuracy=sum(ok) / len(ok), corr_reward_correct=pearson(r, ok),
                       corr_adv_correct=pearson(a, centered))
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.update(evaluate())
        if step in save_steps:
            save(step, updates)
        emit(log)
    if distributed:
        dist.barrier()  # rank 0 may still be writing: tearing gloo down under it can abort a rank at exit
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()

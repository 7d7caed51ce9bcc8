r"""
em_rl.py -- EM-RL (Agarwal et al., arXiv 2505.15134): on-policy RL whose ONLY reward is the model's confidence.

    --reward token           r(y) = -sum_t H(pi(.|x,y_<t))        EM-RL-token (the paper's best math row)
    --reward sequence        r(y) =  sum_t log pi(y_t|x,y_<t)     EM-RL-sequence (E[r] = -trajectory entropy)
    --reward self-certainty  r(y) =  mean_t KL(U || pi(.|x,y_<t))  Intuitor's reward, a label-free neighbour

Each step: --n-rollouts responses (T=1) to each of --batch-size prompts (a prompt's n in one KV-cached generate call);
ONE no-grad forward gives old log-probs, entropies, rewards; leave-one-out baseline per prompt; the update below.

Paper vs released code (verl, run_emrl_*_math.sh, 4 GPUs; papers.md 2). Defaults: the code's (it made the tables).
  paper                    released code = default                                   flag
  reward: sum over tokens  mean over the response's tokens                           --reward-agg sum
  REINFORCE (RLOO)         PPO-clip 0.2, 4 mini-batches of 128 prompts, 1 epoch      --update reinforce
  no entropy term          verl's +0.001 entropy bonus (it RAISES entropy)           --entropy-bonus 0
  (1/N) sum_i A_i sum_t    mean over micro-batches (8 per GPU) of token means        --loss-agg seq-mean-token-sum
  early stop (validation)  one epoch: floor(prompts / 512) steps                     --steps
  4096-token sequences     prompts > 1024 tokens dropped; 3072 new tokens            --max-prompt-length

    # 1 GPU: bf16 policy + bf16 frozen reference; fp32 master weights + AdamW on the GPU if they fit (a 7B on an H200),
    # else on the CPU (~92 GB of host RAM for a 7B on an 80 GB GPU); the paper trained on 35K NuminaMath problems
    python em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl --reward token --out checkpoints/em_rl_token
    # 8 GPUs: FSDP2, fp32 master weights and AdamW state sharded 8 ways (the paper: 35K NuminaMath problems)
    torchrun --nproc_per_node=8 em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl --reward token
    # CPU smoke run on the tiny random model (offline, seconds)
    python tests/tiny_model.py /tmp/tiny && python em_rl.py --model /tmp/tiny --data ../shared/benchmarks/gsm8k.jsonl \
        --limit 8 --batch-size 4 --max-new-tokens 48 --steps 3 --lr 1e-3 --kl-coef 0.01 --save-steps 1 --out /tmp/em_rl

Output: <out>/step_<N>/ (HF folder + train_args.json; N counts rollout steps, each --ppo-minibatches optimizer updates),
<out>/log.jsonl (one line per step; a rerun keeps the old one as log.prev.jsonl). Left out: vLLM, packing, code runs.
"""
import argparse, json, math, os, resource, shutil, statistics, zlib
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
    """Per-token policy-gradient term; the caller aggregates it over tokens (--loss-agg)."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description="EM-RL: RL with the model's own negative entropy as the only reward.")
    # --- model and data
    p.add_argument("--model", required=True, help="hub id or local folder of a causal LM (paper: Qwen2.5-Math-7B)")
    p.add_argument("--data", required=True, help="training prompts: .json/.jsonl/.parquet file or hub dataset id "
                   "(paper: 35K NuminaMath problems); answers are optional, used only for logging")
    p.add_argument("--problem-key", default=None, help="problem column (default: problem/question/prompt/input)")
    p.add_argument("--answer-key", default=None, help="answer column, for accuracy logs only (default: auto)")
    p.add_argument("--limit", type=ev.pos_int, default=None, help="use the first N prompts")
    p.add_argument("--max-prompt-length", type=ev.pos_int, default=1024, help="drop longer prompts (released: 1024)")
    p.add_argument("--template", default="agarwal", choices=list(ev.TEMPLATES), help="prompt format (paper: agarwal)")
    # --- rollouts
    p.add_argument("--batch-size", type=ev.pos_int, default=512, help="prompts per step over all ranks (paper: 512)")
    p.add_argument("--n-rollouts", type=ev.number(int, 2), default=4, help="responses per prompt (paper: 4)")
    p.add_argument("--max-new-tokens", type=ev.pos_int, default=3072, help="response budget (released code: 3072)")
    p.add_argument("--temperature", type=ev.pos_float, default=1.0, help="rollout temperature (released code: 1.0); "
                   "log-probs and rewards are at T=1, so another value makes the update off-policy")
    p.add_argument("--rollout-batch-size", type=ev.pos_int, default=64, help="sequences per generate call (memory)")
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
    p.add_argument("--loss-agg", default="micro-token-mean", choices=["micro-token-mean", "token-mean",
                   "seq-mean-token-sum"], help="per micro-batch (released), per mini-batch token, per response (paper)")
    p.add_argument("--clip-ratio", type=ev.pos_float, default=0.2, help="PPO clip epsilon (released code: 0.2)")
    p.add_argument("--ppo-minibatches", type=ev.pos_int, default=4, help="optimizer updates per rollout batch, 1 epoch")
    p.add_argument("--kl-coef", type=ev.nonneg_float, default=0.001, help="k3 KL to the frozen initial model (0: none)")
    p.add_argument("--entropy-bonus", type=ev.finite_float, default=0.001, help="verl's default bonus; RAISES entropy")
    p.add_argument("--lr", type=ev.pos_float, default=1e-6, help="AdamW learning rate, constant (paper: 1e-6)")
    p.add_argument("--weight-decay", type=ev.nonneg_float, default=0.01, help="AdamW weight decay (verl default)")
    p.add_argument("--grad-clip", type=ev.pos_float, default=1.0, help="max global gradient norm")
    p.add_argument("--steps", type=ev.pos_int, default=None, help="rollout steps (default: one epoch, as released)")
    p.add_argument("--micro-batch-size", type=ev.pos_int, default=8, help="sequences per fwd/bwd per rank (release 8)")
    p.add_argument("--logit-chunk", type=ev.pos_int, default=1024, help="positions per chunk of the vocab projection")
    p.add_argument("--seed", type=ev.seed_int, default=0, help="data order and sampling seed (each rank draws its own)")
    # --- system
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, help="fp32 master weights + "
                   "AdamW on the CPU; default on 1 GPU: on the GPU if they fit beside the bf16 model(s)")
    # --- output and evaluation
    p.add_argument("--out", default="checkpoints/em_rl", help="output folder")
    p.add_argument("--save-steps", type=ev.step_list, default="", help="comma list of steps to checkpoint (+ the last)")
    p.add_argument("--log-rollouts", action="store_true", help="append every response (text, ids, reward, "
                   "advantage) to <out>/rollouts.jsonl")
    p.add_argument("--eval-every", type=ev.nonneg_int, default=0, help="greedy eval every N steps, at 0 and at the end")
    p.add_argument("--eval-benchmark", default="math500", help="evaluate.py benchmark name or file")
    p.add_argument("--eval-limit", type=ev.pos_int, default=100, help="first N problems of the eval benchmark")
    p.add_argument("--eval-max-new-tokens", type=ev.pos_int, default=3072, help="eval generation budget (greedy)")
    p.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files (or Hub)")
    return ev.cli_main(train, p.parse_args(argv), resumes=False)


def train(args):
    # ---------------------------------------------------------------------------- setup
    save_steps = set(args.save_steps)  # (argparse has checked every number's range); the last step joins it below
    if args.steps and max(save_steps, default=0) > args.steps:
        raise ev.EvalError(f"--save-steps {max(save_steps)} is past --steps {args.steps}: it would never be saved")
    ev.check_out_dir(args.out)  # before the model loads
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
    fp32_master = args.offload_optimizer or (cuda and not distributed)  # bf16 model + fp32 master (GPU or CPU)
    if fp32_master and distributed:  # (on a CPU it only serves the tests: a bf16 model with an fp32 master copy)
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
    # checkpointing, chunked logits: a few GB per micro-batch of 8 x 3.3K tokens) + the rollout KV cache (57 KB per
    # token: 64 sequences x 3.3K tokens = 12 GB) ~ 65 GB; fp32 master 30 GB + AdamW moments 60 GB there too if they
    # fit (an H200), else on the CPU (ev.master_placement). torchrun: FSDP2 shards fp32 params/grads/moments N ways
    # (bf16 compute, fp32 gradient reduction); each rank keeps a full bf16 reference. CPU: plain fp32 model, AdamW.
    model, tok = ev.load_model(args.model, "bfloat16" if fp32_master else "float32")
    texts = [ev.build_prompt(tok, q["problem"], args.template) for q in problems]
    prompt_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= min(args.max_prompt_length, context - 1)]  # as verl
    args.steps = args.steps or len(keep) // args.batch_size  # the released run: one epoch, last partial batch dropped
    if not keep or args.steps < 1:
        raise ev.EvalError(f"{len(keep)} of {len(texts)} prompts fit --max-prompt-length and the context" + (
            f"; one epoch of --batch-size {args.batch_size} is 0 steps: give --steps" if keep else ""))
    print(f"{len(texts) - len(keep)} longer prompts dropped, {len(keep)} kept: {args.steps} steps") if master else None
    problems, texts, prompt_ids = ([x[i] for i in keep] for x in (problems, texts, prompt_ids))
    if max(save_steps, default=0) > args.steps:  # (one epoch, resolved just now)
        raise ev.EvalError(f"--save-steps {max(save_steps)} is past the run's {args.steps} steps (never saved)")
    save_steps.add(args.steps)
    if max(map(len, prompt_ids)) + args.max_new_tokens > context and master:
        print(f"warning: a prompt + --max-new-tokens exceeds the model's context of {context} (untrained positions)")
    ref = ev.load_model(args.model, "bfloat16" if cuda else "float32")[0].eval().requires_grad_(False) \
        if args.kl_coef > 0 else None  # bf16 on CUDA as the policy's compute, fp32 on CPU
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
    opt = ev.MasterAdamW(params, ev.master_placement(params, args.offload_optimizer, master) if fp32_master else None,
                         lr=args.lr, weight_decay=args.weight_decay)

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
    log_file = ev.open_log(args.out, "rollouts.jsonl") if master else None  # this run's steps only (rerun)
    per_rank, order, first_len, updates, warned = args.batch_size // world, [], None, 0, False
    if args.eval_every:
        emit({"step": 0, **evaluate()})  # the base model's score, for comparison

    def padded(seqs):  # the rollouts seqs as one [pads | prompt | response | pads] batch
        return pad_batch([prompt_ids[rollouts[s][0]] for s in seqs], [rollouts[s][1]["ids"] for s in seqs],
                         tok.pad_token_id, device)

    def micro_batches(seqs):
        return [seqs[i:i + args.micro_batch_size] for i in range(0, len(seqs), args.micro_batch_size)]

    for step in tqdm(range(1, args.steps + 1), desc="em_rl", disable=not master, dynamic_ncols=True):
        timer = ev.PhaseTimer(cuda)  # rollout, score, fwd_bwd, grad, adamw, copyback: seconds in the log
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # peak_mem_gb: this step's
        # -- rollouts. Prompt order: a fresh seeded permutation per epoch, the same on all ranks; each takes a slice.
        while len(order) < step * args.batch_size:
            order += torch.randperm(len(problems), generator=torch.Generator().manual_seed(args.seed + len(order)))
        idx = [int(i) for i in order[(step - 1) * args.batch_size:step * args.batch_size]][rank * per_rank:][:per_rank]
        model.eval()  # HF turns the KV cache off under gradient checkpointing in train mode
        gather_weights(True)
        rollouts, per_call = [], max(1, args.rollout_batch_size // n)
        for c in range(0, len(idx), per_call):  # all n responses of a prompt in one call: the prompt repeated n times
            group = [i for i in idx[c:c + per_call] for _ in range(n)]
            # a bf16 model (one GPU) generates without autocast, as evaluate.py does: autocast would keep it off the
            # continuous engine (its thread never sees autocast); fp32 FSDP shards keep it (static there anyway)
            with ctx if model.dtype != torch.bfloat16 else nullcontext():
                outs = ev.generate_batch(model, tok, [texts[i] for i in group], args.max_new_tokens, args.temperature,
                                         seed=zlib.crc32(f"{args.seed}/{rank}/{step}/{c}".encode()), engine=args.engine)
            rollouts += zip(group, outs)
        gather_weights(False)
        timer.mark("rollout")
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
        timer.mark("score")
        # -- update. micro-token-mean (verl as released): the whole per-token loss (policy term, entropy bonus, KL) is
        # each micro-batch's own token mean / the rank's micro-batches, averaged over ranks by FSDP. token-mean /
        # seq-mean-token-sum divide by the mini-batch's token / response count over all ranks (* world undoes FSDP).
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kl, clipped tokens, tokens (no sync)
        for mb in torch.arange(S).tensor_split(args.ppo_minibatches if args.update == "ppo-clip" else 1):
            count = torch.tensor(float(sum(lengths[s] for s in mb.tolist()) if args.loss_agg == "token-mean"
                                       else len(mb)), device=device)
            if distributed and args.loss_agg != "micro-token-mean":
                dist.all_reduce(count)  # sync point: the global token (or response) count of this mini-batch
            for chunk in (micro := micro_batches(mb.tolist())):
                with ctx:
                    lp, ent, _, row = stats_fn(*padded(chunk), args.logit_chunk, True)
                old = torch.cat([old_lp[s] for s in chunk])
                a_tok = adv[torch.tensor(chunk, device=device)][row]  # each token gets its response's advantage
                loss = policy_loss(lp, old, a_tok, args)
                loss = loss - args.entropy_bonus * ent  # a BONUS: it raises entropy, against the EM reward (as verl)
                kl = k3_kl(torch.cat([ref_lp[s] for s in chunk]), lp) if ref is not None else torch.zeros_like(lp)
                loss = loss + args.kl_coef * kl
                scale = 1 / (len(lp) * len(micro)) if args.loss_agg == "micro-token-mean" else world / count
                (loss.sum() * scale).backward()
                ratio = (lp - old).exp()
                # clipped = the clip is active (no gradient): ratio past 1+eps with A > 0, or below 1-eps with A < 0
                clipped = ((ratio > 1 + args.clip_ratio) & (a_tok > 0)) | ((ratio < 1 - args.clip_ratio) & (a_tok < 0))
                sums += torch.stack([loss.sum().detach(), kl.sum().detach(), clipped.sum(), lp.new_tensor(len(lp))])
            timer.mark("fwd_bwd")
            grad_norm, updates = opt.step(args.grad_clip, timer), updates + 1  # clip, AdamW, grads set to None
        sec = timer.seconds()
        # -- logs: per-response records of all ranks; accuracy only when the prompts have answers
        ent_sums = torch.stack([e.sum() for e in entropy]).tolist()  # one host sync, not one per response
        recs = gather((r, a, lengths[s], o["truncated"], e, repeat_share(o["ids"]),
                       None if problems[i]["answer"] is None else ev.is_correct(o["text"], problems[i]["answer"]),
                       {"step": step, "rank": rank, "prompt_index": i, "prompt": texts[i], "response": o["text"],
                        "ids": o["ids"], "reward": r, "advantage": a} if args.log_rollouts else None)
                      for s, ((i, o), r, a, e) in enumerate(zip(rollouts, rewards.tolist(), adv.tolist(), ent_sums)))
        r, a, L, trunc, ent_sum, rep, ok, rolls = zip(*recs)
        if master and not warned and sum(trunc) > len(L) / 2:  # once: a response cut before EOS never scores it
            warned = True
            tqdm.write(f"warning: {sum(trunc) / len(L):.0%} of step {step}'s responses hit --max-new-tokens (no EOS)")
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
                   rollout_tok_s=sum(L) / sec["rollout_s"], train_tok_s=world * sum(len(prompt_ids[i]) + len(o["ids"])
                   for i, o in rollouts) / (sec["step_s"] - sec["rollout_s"] - sec["score_s"]), **sec,
                   peak_mem_gb=mem / 2**30, host_rss_gb=ev.host_rss_gb())
        if None not in ok:  # does the label-free reward agree with the truth? pooled, and within each prompt's group
            centered = [c - sum(ok[j - j % n:j - j % n + n]) / n for j, c in enumerate(ok)]
            log.update(accuracy=sum(ok) / len(ok), corr_reward_correct=pearson(r, ok),
                       corr_adv_correct=pearson(a, centered))
        ev.check_finite(step, loss=log["loss"], grad_norm=log["grad_norm"])  # before anything is saved
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.update(evaluate())
        if step in save_steps:
            save(step, updates)
            log["checkpoint"] = f"step_{step}"  # the log lists the checkpoints that exist
        emit(log)
    if distributed:
        dist.barrier()  # rank 0 may still be writing: tearing gloo down under it can abort a rank at exit
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()

r"""
EM-RL (Agarwal et al., arXiv 2505.15134): on-policy RL, --n-rollouts responses a prompt, whose only
reward is the model's confidence (--reward token: -sum_t H_t, sequence: log pi(y|x),
self-certainty: Intuitor's) or a control (majority, random, format).

    python em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl  # 1 GPU
    torchrun --nproc_per_node=8 em_rl.py --model Qwen/Qwen2.5-Math-7B --data numina.jsonl
    python tests/tiny_model.py /tmp/tiny && python em_rl.py --model /tmp/tiny --data \
        tests/data/gsm8k.jsonl --batch-size 4 --max-new-tokens 48 --steps 3  # CPU

Paper vs released code (verl: the tables, our defaults):
  paper                  released = default                       flag
  reward: sum of tokens  mean over the response's tokens          --reward-agg sum
  REINFORCE (RLOO)       PPO-clip 0.2, 4 mini-batches, 1 epoch    --update reinforce
  no entropy term        +0.001 entropy bonus (raises H)          --entropy-bonus 0
  (1/N) sum_i A_i sum_t  mean of micro-batch (8/GPU) token means  --loss-agg seq-mean-token-sum
  early stop (val. set)  one epoch: floor(prompts / 512) steps    --steps
  4096-token sequences   prompts > 1024 tokens dropped; 3072 new  --max-prompt-length
--rollout-engine vllm: a vLLM engine per process, synced after each update.
Left out: packing. Outputs: step_<N>/ (N: rollout steps), log.jsonl.
"""
import argparse, json, math, os, statistics, types, zlib
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate as ev
import training as tr


# ---- method: EM-RL rewards and baselines (no grad); copy this block ----
from torch.utils.checkpoint import checkpoint


def logit_stats(logits, targets):
    """Per position at T=1: log pi(target), entropy, KL(U || pi) (self-certainty)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # fp32: bf16 is too coarse
    entropy = -(logp.exp() * logp).sum(-1)
    certainty = -math.log(logp.shape[-1]) - logp.mean(-1)
    return logp.gather(-1, targets[:, None])[:, 0], entropy, certainty


def response_stats(model, ids, attn, resp, chunk=1024, grad=False):
    """logit_stats and row at each response token: ONE forward, the vocab projection in chunks
    (checkpointed with grad); ids, attn, resp: training.pack's."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # real tokens only, as generate counts
    h = model.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=False).last_hidden_state
    sel = resp[:, 1:]  # the state at t predicts token t+1
    h, targets, row = h[:, :-1][sel], ids[:, 1:][sel], sel.nonzero()[:, 0]
    stats = lambda h, t: logit_stats(model.lm_head(h), t)
    out = [checkpoint(stats, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False) if grad
           else stats(h[i:i + chunk], targets[i:i + chunk]) for i in range(0, len(h), chunk)]
    return (*(torch.cat(x) for x in zip(*out)), row)


def em_rewards(logp, entropy, certainty, row, n_rows, kind, agg):
    """A reward per response from its tokens' stats (row[i]: token i's)."""
    per_token = {"sequence": logp, "token": -entropy, "self-certainty": certainty}[kind].detach()
    total = per_token.new_zeros(n_rows).index_add_(0, row, per_token)
    if agg == "sum":  # the paper's (a sum of negative terms also rewards being SHORT)
        return total
    return total / torch.bincount(row, minlength=n_rows).clamp(min=1)


def group_advantages(rewards, n, baseline):
    """Rewards of consecutive groups of n (a prompt's) -> advantages."""
    r = rewards.view(-1, n)
    if baseline == "rloo":  # leave-one-out: r_i - mean of the other n-1
        return (r - (r.sum(1, keepdim=True) - r) / (n - 1)).flatten()
    # GRPO: z-score (unbiased std, as verl); eps keeps equal rewards at 0
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).flatten()
# ---- end method ----


EM_REWARDS, CONTROLS = ("token", "sequence", "self-certainty"), ("majority", "random", "format")


def control_rewards(problems, texts, kind, n, generator):
    """Controls, n a prompt: majority (TTRL: 1 for the most common answer, none never, ties all),
    random (seeded Bernoulli(0.5)), format (\\boxed{}, code, tag)."""
    if kind == "random":
        return (torch.rand(len(texts), generator=generator) < 0.5).float()
    if kind == "format":
        return torch.tensor([float(ev.answer_format(p, t)) for p, t in zip(problems, texts)])
    answers, out = [ev.final_answer(p, t) for p, t in zip(problems, texts)], []
    for g in range(0, len(texts), n):
        votes = Counter(a for a in answers[g:g + n] if a is not None)
        out += [float(a is not None and votes[a] == max(votes.values())) for a in answers[g:g + n]]
    return torch.tensor(out)


# ---- the policy-gradient update, as verl's ----
def k3_kl(ref_logp, logp):
    """k3 KL(pi || ref): exp(r) - r - 1, r = ref - logp, clamped (verl's low_var_kl)."""
    r = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(r) - r - 1).clamp(-10, 10)


def policy_loss(logp, old_logp, adv, update, clip_ratio):
    """Per-token policy-gradient term (the caller aggregates it: --loss-agg)."""
    if update == "reinforce":  # the paper's, on-policy
        return -adv * logp
    ratio = torch.exp(logp - old_logp)  # 1 on the first mini-batch
    clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    return -torch.min(ratio * adv, clipped * adv)  # no gain past the clip


def pearson(x, y):  # nan when a side is constant
    try:
        return statistics.correlation([float(v) for v in x], [float(v) for v in y])
    except statistics.StatisticsError:
        return float("nan")


# ---- the loop's pieces ----
def sample_rollouts(model, tok, texts, prompt_ids, idx, args, rank, step, engine=None):
    """A record per response; n a prompt from one call (vLLM: all, with log-probs)."""
    model.eval()  # (checkpointing in train mode: no KV cache)
    out, per_call = [], len(idx) if engine else max(1, args.rollout_batch_size // args.n_rollouts)
    for c in range(0, len(idx), per_call):
        group = [i for i in idx[c:c + per_call] for _ in range(args.n_rollouts)]
        outs = ev.generate_batch(
            engine or model, tok, [texts[i] for i in group], args.max_new_tokens, args.temperature,
            logprobs=bool(engine), seed=zlib.crc32(f"{args.seed}/{rank}/{step}/{c}".encode()))
        out += [dict(o, i=i, prompt_ids=prompt_ids[i]) for i, o in zip(group, outs)]
    return out


def score(model, ref, rolls, pad_id, args, ctx):
    """ONE no-grad forward a micro-batch: old/ref log-probs, entropies -> EM rewards."""
    out, device, size = [], next(model.parameters()).device, args.micro_batch_size
    for mb in (rolls[i:i + size] for i in range(0, len(rolls), size)):
        batch = tr.pack([(r["prompt_ids"], r["ids"]) for r in mb], pad_id, device)
        sizes = [len(r["ids"]) for r in mb]
        with torch.no_grad(), ctx:
            lp, ent, cert, row = model.response_stats(*batch, args.logit_chunk)
            if args.reward in EM_REWARDS:
                out.append(em_rewards(lp, ent, cert, row, len(mb), args.reward, args.reward_agg))
            ref_lp = (response_stats(ref, *batch, args.logit_chunk)[0].split(sizes)
                      if ref is not None else [None] * len(mb))
        for r, x, e, q in zip(mb, lp.split(sizes), ent.split(sizes), ref_lp):
            r.update(old_lp=x, entropy=e, ref_lp=q)
            if r.get("logprobs"):  # vLLM's: a sync bug shows at once
                r["gap"] = (x.float() - x.new_tensor(r["logprobs"]).float()).abs().max()
    return torch.cat(out) if out else None


def update(model, opt, rolls, adv, pad_id, args, world, timer, ctx):
    """--ppo-minibatches updates (reinforce: 1); micro-token-mean (verl): micro-batch token means /
    their count; token-mean / seq-mean-token-sum: / all ranks' tokens / responses."""
    sums = torch.zeros(4, dtype=torch.float64, device=adv.device)  # no host sync
    model.train()
    for mb in torch.arange(len(rolls)).tensor_split(
            args.ppo_minibatches if args.update == "ppo-clip" else 1):
        mb = mb.tolist()
        total = sum(len(rolls[s]["ids"]) for s in mb) if args.loss_agg == "token-mean" else len(mb)
        count = torch.tensor(float(total), device=adv.device)
        if world > 1 and args.loss_agg != "micro-token-mean":
            dist.all_reduce(count)  # sync: the count, all ranks
        micro = [mb[i:i + args.micro_batch_size] for i in range(0, len(mb), args.micro_batch_size)]
        for seqs in micro:
            part = [rolls[s] for s in seqs]
            batch = tr.pack([(r["prompt_ids"], r["ids"]) for r in part], pad_id, adv.device)
            with ctx:
                lp, ent, _, row = model.response_stats(*batch, args.logit_chunk, True)
            old, a = torch.cat([r["old_lp"] for r in part]), adv[seqs][row]
            loss = policy_loss(lp, old, a, args.update, args.clip_ratio) - args.entropy_bonus * ent
            kl = (k3_kl(torch.cat([r["ref_lp"] for r in part]), lp)
                  if part[0]["ref_lp"] is not None else torch.zeros_like(lp))
            loss = loss + args.kl_coef * kl
            scale = (1 / (len(lp) * len(micro)) if args.loss_agg == "micro-token-mean"
                     else world / count)  # * world undoes FSDP's averaging
            (loss.sum() * scale).backward()
            ratio = (lp - old).exp()  # clipped: past 1 + eps for A > 0, 1 - eps for A < 0
            clipped = (ratio - ratio.clamp(1 - args.clip_ratio, 1 + args.clip_ratio)) * a > 0
            sums += torch.stack([
                loss.sum().detach(), kl.sum().detach(), clipped.sum(), lp.new_tensor(len(lp))])
        timer.mark("fwd_bwd")
        grad_norm = opt.step(args.grad_clip)
        timer.mark("optimizer")
    return sums, grad_norm


def step_log(recs, n, first_len):
    """A step's metrics; with answers, accuracy (also best-of-n's), correlations with it."""
    N, L = len(recs), sum(r["length"] for r in recs)
    mean = lambda key: sum(r[key] for r in recs) / N
    gap = [r["engine_gap"] for r in recs if r["engine_gap"] is not None]
    log = dict(reward=mean("reward"), length=L / N, entropy=sum(r["entropy_sum"] for r in recs) / L,
               **({"engine_logp_gap": max(gap)} if gap else {}), length_vs_step1=L / N / first_len,
               truncated=mean("truncated"), repetition_rate=mean("loops"))
    ok = [r["correct"] for r in recs]
    if None not in ok:
        centered = [c - sum(ok[j - j % n:j - j % n + n]) / n for j, c in enumerate(ok)]
        best = [max(recs[j:j + n], key=lambda r: r["reward"])["correct"] for j in range(0, N, n)]
        log.update(accuracy=sum(ok) / N, best_of_n_accuracy=sum(best) / len(best),
                   corr_reward_correct=pearson([r["reward"] for r in recs], ok),
                   corr_adv_correct=pearson([r["advantage"] for r in recs], centered))
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description="EM-RL: RL with the model's confidence as reward.")
    arg = p.add_argument
    # ---- model and data ----
    arg("--model", required=True, help="hub id or local folder of a causal LM")
    arg("--data", required=True, help="prompts: file, benchmark or hub id (answers: logs)")
    arg("--problem-key", help="problem column (default: problem/question/...)")
    arg("--answer-key", help="answer column (default: answer/...)")
    arg("--limit", type=ev.pos_int, help="the first N prompts")
    arg("--max-prompt-length", type=ev.pos_int, default=1024, help="drop longer")
    arg("--template", default="agarwal", choices=list(ev.TEMPLATES), help="prompts")
    arg("--eval-template", choices=list(ev.TEMPLATES), help="eval prompts (default: --template)")
    # ---- rollouts ----
    arg("--batch-size", type=ev.pos_int, default=512, help="prompts per step, all ranks")
    arg("--n-rollouts", type=ev.number(int, 2), default=4, help="responses per prompt")
    arg("--max-new-tokens", type=ev.pos_int, default=3072, help="response budget")
    arg("--temperature", type=ev.pos_float, default=1.0, help="(else off-policy)")
    arg("--rollout-batch-size", type=ev.pos_int, default=64, help="per generate")
    arg("--rollout-engine", default="static", choices=["static", "vllm"], help="vllm: synced")
    arg("--rollout-gpu-memory", type=ev.unit_float, default=0.3, help="vLLM's GPU share")
    # ---- reward, advantage, update ----
    arg("--reward", default="token", choices=EM_REWARDS + CONTROLS, help="EM, or a control")
    arg("--reward-agg", default="mean", choices=["mean", "sum"], help="over tokens")
    arg("--baseline", default="rloo", choices=["rloo", "grpo"], help="or z-scores")
    arg("--update", default="ppo-clip", choices=["ppo-clip", "reinforce"], help="or the paper's")
    arg("--loss-agg", default="micro-token-mean", choices=[
        "micro-token-mean", "token-mean", "seq-mean-token-sum"], help="see update()")
    arg("--clip-ratio", type=ev.pos_float, default=0.2, help="PPO clip epsilon")
    arg("--ppo-minibatches", type=ev.pos_int, default=4, help="updates per step")
    arg("--kl-coef", type=ev.nonneg_float, default=0.001, help="k3 KL to the start")
    arg("--entropy-bonus", type=ev.finite_float, default=0.001, help="RAISES entropy")
    arg("--lr", type=ev.pos_float, default=1e-6, help="AdamW learning rate, constant")
    arg("--weight-decay", type=ev.nonneg_float, default=0.01, help="AdamW weight decay")
    arg("--grad-clip", type=ev.pos_float, default=1.0, help="max global gradient norm")
    arg("--steps", type=ev.pos_int, help="rollout steps (default: one epoch)")
    arg("--micro-batch-size", type=ev.pos_int, default=8, help="per fwd/bwd per rank")
    arg("--logit-chunk", type=ev.pos_int, default=1024, help="positions per chunk")
    arg("--seed", type=ev.seed_int, default=0, help="data order and sampling seed")
    # ---- system, output, eval ----
    arg("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="(on with CUDA)")
    arg("--offload-optimizer", action=argparse.BooleanOptionalAction, help="AdamW on the CPU")
    arg("--out", default="checkpoints/em_rl", help="output folder (shared)")
    arg("--dist-timeout", type=ev.pos_float, default=3600, help="torchrun: s per collective")
    arg("--save-steps", type=tr.step_list, default="", help="to save (+ the last)")
    arg("--log-rollouts", action="store_true", help="to rollouts.jsonl")
    arg("--eval-every", type=ev.nonneg_int, default=0, help="greedy eval every N")
    arg("--eval-benchmark", default="math500", help="benchmark name or file")
    arg("--eval-limit", type=ev.pos_int, default=100, help="its first N problems")
    arg("--eval-max-new-tokens", type=ev.pos_int, default=3072, help="its budget")
    arg("--engine", default=os.environ.get("EM_ENGINE", "auto"), choices=ev.ENGINES, help="eval's")
    arg("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files")
    arg("--allow-code-execution", action="store_true", help="run the model's programs")
    arg("--code-workers", type=ev.pos_int, help="programs run in parallel")
    return ev.cli_main(train, p.parse_args(argv), resumes=False)


def train(args):
    # ---- setup ----
    save_steps, world = set(args.save_steps), int(os.environ.get("WORLD_SIZE", 1))
    args.eval_template = args.eval_template or args.template
    if args.steps and max(save_steps, default=0) > args.steps:
        raise ev.EvalError(f"--save-steps {max(save_steps)} is past --steps {args.steps}")
    if args.batch_size % world or args.ppo_minibatches > args.batch_size // world * args.n_rollouts:
        raise ev.EvalError(f"--batch-size {args.batch_size} must split over the {world} ranks, "
                           "with at least --ppo-minibatches responses per rank")
    cuda = torch.cuda.is_available()
    fp32_master = args.offload_optimizer or (cuda and world == 1)  # bf16 model, fp32 master
    if fp32_master and world > 1:
        raise ev.EvalError("--offload-optimizer is for one process; torchrun shards with FSDP2")
    ev.check_out_dir(args.out)  # before the model loads
    rank, world = ev.init_distributed(args.dist_timeout)
    master, n, device = rank == 0, args.n_rollouts, torch.device("cuda" if cuda else "cpu")
    ctx = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    # ---- data ----
    problems = ev.load_benchmark(args.data, args.data_dir, args.problem_key, args.answer_key,
                                 limit=args.limit, require_answer=False)
    eval_set = ev.load_benchmark(args.eval_benchmark, args.data_dir, limit=args.eval_limit) \
        if args.eval_every else []
    ev.require_code_consent(problems + eval_set, args.allow_code_execution)  # before the model
    # ---- model ----
    # 1 GPU: bf16 policy + fp32 master, bf16 reference
    model, tok = ev.load_model(args.model, "bfloat16" if fp32_master else "float32")
    texts = [ev.build_prompt(tok, q, args.template) for q in problems]
    prompt_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    longest = min(args.max_prompt_length, context - 1)
    keep = [i for i, x in enumerate(prompt_ids) if len(x) <= longest]
    args.steps = args.steps or len(keep) // args.batch_size  # one epoch, as released
    if not keep or args.steps < 1:
        raise ev.EvalError(f"{len(keep)} of {len(texts)} prompts fit --max-prompt-length and the "
                           "context" + (f"; one epoch of --batch-size {args.batch_size} is 0 "
                                        "steps: give --steps" if keep else ""))
    if master:
        print(f"{len(texts) - len(keep)} longer prompts dropped, {len(keep)} kept: "
              f"{args.steps} steps")
    problems, texts, prompt_ids = ([x[i] for i in keep] for x in (problems, texts, prompt_ids))
    if max(save_steps, default=0) > args.steps:  # (one epoch: just resolved)
        raise ev.EvalError(f"--save-steps {max(save_steps)} is past the run's {args.steps} steps")
    save_steps.add(args.steps)
    if max(map(len, prompt_ids)) + args.max_new_tokens > context and master:
        print(f"warning: a prompt + --max-new-tokens exceeds the model's context of {context}")
    ref = ev.load_model(args.model, "bfloat16" if cuda else "float32")[0].eval().requires_grad_(
        False) if args.kl_coef > 0 else None
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and cuda):
        enable = getattr(model, "activation_checkpointing_enable", None)  # (the old name warns)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    model.response_stats = types.MethodType(response_stats, model)  # FSDP: a forward
    if world > 1:  # FSDP2 (gloo on CPU too)
        tr.shard_model(model, "response_stats", cuda)
    engine = tr.start_engine(args, rank)  # before the optimizer's placement counts free memory
    params = [q for q in model.parameters() if q.requires_grad]
    where = fp32_master and tr.master_placement(params, args.offload_optimizer, master)
    opt = tr.MasterAdamW(params, where or None, lr=args.lr, weight_decay=args.weight_decay)
    # ---- loop ----
    log_file = tr.open_log(args.out, "rollouts.jsonl") if master else None
    per_rank, order, first_len, updates, said = args.batch_size // world, [], None, 0, set()
    if args.eval_every:  # the base model's score
        base = tr.evaluate_on_ranks(model, tok, eval_set, args, rank, world, engine, 0)
        if master:
            tr.log_step(log_file, {"step": 0, **base})
    for step in tqdm(range(1, args.steps + 1), desc="em_rl", disable=not master,
                     dynamic_ncols=True):
        timer = tr.PhaseTimer(cuda)
        # a seeded permutation per epoch, alike on all ranks; a slice each
        while len(order) < step * args.batch_size:
            order += torch.randperm(len(problems), generator=torch.Generator().manual_seed(
                args.seed + len(order))).tolist()
        idx = order[(step - 1) * args.batch_size:][rank * per_rank:][:per_rank]
        sampler = engine if args.rollout_engine == "vllm" else None
        tr.sync_engine(sampler, model, updates)
        tr.set_gathered(model, sampler is None)  # the model decodes: gathered
        rolls = sample_rollouts(model, tok, texts, prompt_ids, idx, args, rank, step, sampler)
        tr.set_gathered(model, False)
        timer.mark("rollout")
        probs, outs = [problems[r["i"]] for r in rolls], [r["text"] for r in rolls]
        rewards = score(model, ref, rolls, tok.pad_token_id, args, ctx)
        if args.reward in CONTROLS:  # random: seeded per (seed, rank, step)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{rank}/{step}/r".encode()))
            rewards = control_rewards(probs, outs, args.reward, n, gen).to(device)
        adv = group_advantages(rewards, n, args.baseline)  # a group never straddles ranks
        timer.mark("score")
        sums, grad_norm = update(model, opt, rolls, adv, tok.pad_token_id, args, world, timer, ctx)
        updates += args.ppo_minibatches if args.update == "ppo-clip" else 1
        sec = timer.seconds()
        # ---- logs ----
        graded = ev.grade_batch(probs, outs, workers=args.code_workers)
        lp0 = rolls[0]["entropy"].new_zeros(())
        ent_sums, gaps = torch.stack([  # one sync
            torch.stack([r["entropy"].sum(), r.get("gap", lp0)]) for r in rolls]).T.tolist()
        recs = ev.gather_lists([{
            "reward": rw, "advantage": a, "length": len(r["ids"]), "truncated": r["truncated"],
            "entropy_sum": e, "loops": ev.loops(r["text"]),
            "correct": None if why == ev.NO_GOLD else ok, "engine_gap": g if sampler else None,
            **({"step": step, "rank": rank, "prompt_index": r["i"], "prompt": texts[r["i"]],
                "response": r["text"], "ids": r["ids"]} if args.log_rollouts else {})}
            for r, rw, a, e, g, (ok, why) in zip(
                rolls, rewards.tolist(), adv.tolist(), ent_sums, gaps, graded)], world)
        if master and args.log_rollouts:  # rank order: groups of n stay together
            with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        if world > 1:
            dist.all_reduce(sums)
        first_len = first_len or sum(r["length"] for r in recs) / len(recs)
        loss, kl, clip_frac = (sums[:3] / sums[3]).tolist()
        log = dict(step=step, updates=updates, loss=loss, **step_log(recs, n, first_len), kl=kl,
                   clip_frac=clip_frac, grad_norm=grad_norm.item(),
                   rollout_tok_s=sum(r["length"] for r in recs) / sec["rollout_s"],
                   train_tok_s=world * sum(len(r["prompt_ids"]) + len(r["ids"]) for r in rolls) / (
                       sec["step_s"] - sec["rollout_s"] - sec["score_s"]), **sec,
                   **tr.memory_gb(cuda))
        if master:
            tr.warn_once(said, step, log["truncated"], log["length"], first_len,
                         log["repetition_rate"], args.max_new_tokens)
        tr.check_finite(step, loss=loss, grad_norm=log["grad_norm"])  # before saving
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            log.update(tr.evaluate_on_ranks(
                model, tok, eval_set, args, rank, world, engine, updates))
        if step in save_steps:
            tr.save_checkpoint(model, tok, os.path.join(args.out, f"step_{step}"), {
                "args": vars(args), "seed": args.seed, "step": step, "optimizer_updates": updates},
                rank, world)
            log["checkpoint"] = f"step_{step}"
        if master:
            tr.log_step(log_file, log)
    ev.end_distributed()
    return model


if __name__ == "__main__":
    main()

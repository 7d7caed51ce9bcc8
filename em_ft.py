"""
Entropy-minimization fine-tuning: One-shot EM (Gao et al., arXiv 2505.20282) and EM-FT (Agarwal
et al., arXiv 2505.15134). Each optimizer update samples responses from the current model, then
minimizes the entropy of softmax(z/T) at the generated positions. No reward, no labels, no KL.

    python em_ft.py --model Qwen/Qwen2.5-Math-7B --out ckpt/oneshot           # 1 GPU, the recipe
    torchrun --nproc_per_node=8 em_ft.py --model Qwen/Qwen2.5-Math-7B          # FSDP2
    torchrun --nproc_per_node=8 em_ft.py --recipe em-ft --model Qwen/Qwen2.5-Math-7B --data FILE
    python tests/tiny_model.py /tmp/tiny && python em_ft.py --model /tmp/tiny --max-steps 3  # CPU

A step is one OPTIMIZER UPDATE of --batch-size rollouts. The release counted one micro-batch of 2
per GPU: its step_10 (8 GPUs) is our --max-steps 2, the default. Released One-shot EM code vs here:
  released                                here (default)             the released form
  logit at t scores token t (no shift)    it scores token t+1        none (a fix)
  mask from the non-pad prompt count      each row's own boundary    none (a fix: left padding)
  EOS unscored when it equals pad         EOS scored                 none (a fix)
  token mean per micro-batch of 2,        token mean over the        --loss-norm micro-token-mean
    mean over micro-batches                 whole update               --micro-batch-size 2
  ZeRO-2, fp32 master + Adam on CPU       on the GPU if they fit     --offload-optimizer
--rollout-engine vllm: rollouts from one vLLM engine per process, the trained weights synced in
after each update. Left out: LoRA, packing, optimizer state in checkpoints (weights only).
Outputs in --out: step_<N>/ (HF folder + train_args.json), log.jsonl (updates and checkpoints).
"""
import argparse, itertools, json, os, random, types
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate as ev
import training as tr

# One-shot EM's prompt pi_1 (row 124 of the DeepScaleR subset; gold 12.8, never used by EM).
PI1 = ("The pressure \\( P \\) exerted by wind on a sail varies jointly as the area \\( A \\) of "
       "the sail and the cube of the wind's velocity \\( V \\). When the velocity is \\( 8 \\) "
       "miles per hour, the pressure on a sail of \\( 2 \\) square feet is \\( 4 \\) pounds. Find "
       "the wind velocity when the pressure on \\( 4 \\) square feet of sail is \\( 32 \\) pounds.")
RECIPES = {
    # Gao et al.'s released code: pi_1 only, the bare problem in the chat template, 64 rollouts.
    "one-shot": dict(template="chat", batch_size=64, max_new_tokens=512, temperature=0.5,
                     top_p=0.95, repetition_penalty=1.15, loss_temperature=0.5,
                     loss_norm="token-mean", lr=2e-5, max_steps=2, eval_template="qwen-math"),
    # Agarwal et al.'s EM-FT: 512 prompts x 1 sample, 4096-token sequences, no loss temperature.
    # Unstated in the paper, our choice: lr 1e-6 and rollouts at T=1 (their RL runs).
    "em-ft": dict(template="agarwal", batch_size=512, max_new_tokens=3072, temperature=1.0,
                  top_p=1.0, repetition_penalty=1.0, loss_temperature=1.0,
                  loss_norm="trajectory-sum", lr=1e-6, max_steps=40, eval_template="agarwal"),
}


# ---- method: entropy minimization (One-shot EM / EM-FT); copy this block ----
from torch.utils.checkpoint import checkpoint


def token_entropy(h, lm_head, T):
    """Entropy of softmax(lm_head(h) / T) for a chunk of positions: [n, hidden] -> [n], in fp32."""
    logp = torch.log_softmax(lm_head(h).float() / T, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_entropy(model, ids, attn, resp, T, chunk):
    """Per row: the sum of token entropies over its response positions, and its response length.
    ids, attn: left-padded prompt + response rows; resp: True at response tokens, EOS included
    (pads after it never: training.pack builds such a batch)."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: count from each row's first token
    h = model.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=False).last_hidden_state
    # The logit at t predicts token t+1: score t iff token t+1 is a response token (the last
    # prompt position made the first response token; the one after EOS was never sampled).
    target = resp[:, 1:]
    h = h[:, :-1][target]  # [response tokens, hidden]: logits only where they are scored
    # chunks under checkpoint: one chunk's fp32 [n, vocab] logits at a time, recomputed in backward
    ent = torch.cat([checkpoint(token_entropy, h[i:i + chunk], model.lm_head, T,
                                use_reentrant=False) for i in range(0, len(h), chunk)])
    rows = target.nonzero()[:, 0]
    return torch.zeros(len(ids), device=ent.device).index_add(0, rows, ent), target.sum(1)


def em_loss(ent_sum, n_tok, loss_norm, tokens, responses, micro_batches):
    """The loss to backward for one micro-batch (ent_sum: its summed token entropies, n_tok: its
    response tokens), normalized by counts of the WHOLE update: tokens, responses and
    micro_batches summed over all micro-batches and all ranks, so the micro-batches' losses add up
    to the update's loss however it is split (data parallel averages gradients over ranks:
    backward loss * world to keep their sum)."""
    if loss_norm == "token-mean":  # One-shot EM: every generated token weighs the same
        return ent_sum / tokens
    if loss_norm == "trajectory-sum":  # EM-FT: sum_t H_t per response ~ H(y|x); mean over responses
        return ent_sum / responses
    # micro-token-mean, the released loop: each micro-batch's own token mean, averaged over
    # micro-batches (a token weighs 1 / its micro-batch's tokens: short micro-batches count more)
    return ent_sum / n_tok / micro_batches
# ---- end method ----


def sample_rollouts(model, tokenizer, prompts, lengths, args, seed, engine=None):
    """One response per prompt: from the vLLM engine in one call (row i seeded from (seed, i)), or
    from the model in length-sorted KV-cached calls of --rollout-batch-size (the first seeded)."""
    if engine is not None:
        return ev.generate_batch(engine, tokenizer, prompts, args.max_new_tokens, args.temperature,
                                 args.top_p, seed, args.repetition_penalty)
    model.eval()
    out = [None] * len(prompts)
    for c, idx in enumerate(ev.length_sorted_batches(lengths, args.rollout_batch_size)):
        res = ev.generate_batch(model, tokenizer, [prompts[i] for i in idx], args.max_new_tokens,
                                args.temperature, args.top_p, seed=seed if c == 0 else None,
                                repetition_penalty=args.repetition_penalty)
        for i, r in zip(idx, res):
            out[i] = r
    model.train()
    return out


def accumulate_gradients(model, rows, pad_id, args, tokens, responses, world=1, ctx=nullcontext()):
    """Forward/backward over micro-batches of rows (tokens, responses: counts of the update over
    all ranks). Returns this rank's summed token entropy and its share of the loss."""
    device, total, b, n = next(model.parameters()).device, 0.0, args.micro_batch_size, len(rows)
    # micro-token-mean: the grouping is part of the loss, so it is the release's (consecutive rows
    # in sampling order); else micro-batches of similar length (less padding, the same gradient)
    micro = ([range(i, min(i + b, n)) for i in range(0, n, b)]
             if args.loss_norm == "micro-token-mean"
             else ev.length_sorted_batches([len(p) + len(r) for p, r in rows], b))
    for idx in micro:
        ids, attn, resp = tr.pack([rows[i] for i in idx], pad_id, device)
        with ctx:
            ent, n_tok = model.response_entropy(ids, attn, resp, args.loss_temperature,
                                                args.entropy_chunk)
        loss = em_loss(ent.sum(), n_tok.sum(), args.loss_norm, tokens, responses,
                       len(micro) * world)
        (loss * world).backward()  # FSDP averages gradients over ranks: * world keeps the sum
        total = total + torch.stack([ent.sum(), loss]).detach()  # on the device: no sync here
    return total.tolist()


def run_eval(model, tokenizer, eval_set, args, step, rank, world, log, engine):
    """Greedy eval, each rank on its share; rank 0 logs the metrics of all samples."""
    m = tr.evaluate_on_ranks(model, tokenizer, eval_set, args, rank, world, engine, step)
    if rank == 0:
        tqdm.write(f"eval step {step}: {args.eval_benchmark} pass@1 {m['eval_pass@1']:.1f}")
        print(json.dumps({"step": step, **m}), file=log, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Entropy-minimization fine-tuning (One-shot EM, EM-FT).")
    arg = p.add_argument
    # ---- recipe and data ----
    # (None: the recipe's value, one-shot / em-ft in the help; see RECIPES)
    arg("--recipe", default="one-shot", choices=list(RECIPES), help="set of defaults")
    arg("--model", required=True, help="hub id or local folder of a causal LM")
    arg("--data", help="prompt set: .json/.jsonl/.parquet file or hub id (one-shot: the "
        "embedded prompt pi_1; em-ft: required)")
    arg("--problem-key", help="problem column (default: problem/question/...)")
    arg("--template", choices=list(ev.TEMPLATES), help="prompt format (chat / agarwal)")
    # ---- rollouts ----
    arg("--batch-size", type=ev.pos_int, help="rollouts per update, all ranks (64 / 512)")
    arg("--max-new-tokens", type=ev.pos_int, help="response budget (512 / 3072)")
    arg("--temperature", type=ev.nonneg_float, help="rollout temperature (0.5 / 1.0)")
    arg("--top-p", type=ev.unit_float, help="rollout nucleus sampling (0.95 / 1.0)")
    arg("--repetition-penalty", type=ev.pos_float, help="rollout penalty (1.15 / 1.0)")
    arg("--rollout-batch-size", type=ev.pos_int, default=64, help="per generate call")
    arg("--rollout-engine", default="static", choices=["static", "vllm"], help="vllm: one "
        "engine per process, the weights synced after each update")
    arg("--rollout-gpu-memory", type=ev.unit_float, default=0.3, help="vLLM's GPU share")
    # ---- loss ----
    arg("--loss-temperature", type=ev.pos_float, help="T in softmax(z/T) (0.5 / 1.0)")
    arg("--loss-norm", choices=["token-mean", "trajectory-sum", "micro-token-mean"],
        help="token-mean / trajectory-sum; micro-token-mean: the release's (em_loss)")
    arg("--entropy-chunk", type=ev.pos_int, default=1024, help="positions per chunk")
    # ---- optimizer (AdamW, constant lr) ----
    arg("--max-steps", type=ev.pos_int, help="optimizer updates (2 = the paper's step_10 / 40)")
    arg("--lr", type=ev.pos_float, help="learning rate (2e-5 / 1e-6)")
    arg("--weight-decay", type=ev.nonneg_float, default=0.01, help="AdamW weight decay")
    arg("--betas", type=ev.unit_open, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    arg("--eps", type=ev.pos_float, default=1e-8, help="AdamW epsilon")
    arg("--grad-clip", type=ev.pos_float, default=1.0, help="max global gradient norm")
    arg("--micro-batch-size", type=ev.pos_int, default=8, help="sequences per fwd/bwd")
    arg("--seed", type=ev.seed_int, default=15, help="the paper's 15 (seed-sensitive)")
    # ---- evaluation and early stopping ----
    arg("--eval-every", type=ev.nonneg_int, default=0, help="eval at 0, every N updates")
    arg("--eval-benchmark", default="math500", help="benchmark name or file")
    arg("--eval-limit", type=ev.pos_int, default=100, help="its first N problems")
    arg("--eval-max-new-tokens", type=ev.pos_int, default=3072, help="greedy eval budget")
    arg("--eval-template", choices=list(ev.TEMPLATES), help="qwen-math / agarwal")
    arg("--engine", default=os.environ.get("EM_ENGINE", "auto"), choices=ev.ENGINES,
        help="eval engine: auto (or $EM_ENGINE): vLLM where installed")
    arg("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="a folder with local "
        "copies of the benchmark files (default $EM_DATA_DIR, else the Hub)")
    arg("--allow-code-execution", action="store_true", help="consent to run the model's "
        "programs (a code --eval-benchmark)")
    arg("--code-workers", type=ev.pos_int, help="programs graded in parallel (default: CPUs)")
    arg("--stop-entropy", type=ev.nonneg_float, help="stop once the entropy is < X")
    arg("--stop-entropy-drop", type=ev.unit_float, help="stop once it fell by this share")
    # ---- checkpoints and system ----
    arg("--out", default="em_ft_out", help="output folder (shared by every node)")
    arg("--dist-timeout", type=ev.pos_float, default=3600, help="torchrun: seconds per collective")
    arg("--log-rollouts", action="store_true", help="rollouts to <out>/rollouts.jsonl")
    arg("--save-steps", type=tr.step_list, default="", help="updates to save (+ the last)")
    arg("--offload-optimizer", action=argparse.BooleanOptionalAction, help="fp32 master "
        "+ AdamW on the CPU (default, 1 GPU: on the GPU if they fit)")
    arg("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
        help="recompute activations in backward (default: on with CUDA)")
    args = p.parse_args(argv)
    for k, v in RECIPES[args.recipe].items():  # the recipe fills what the command line left unset
        if getattr(args, k) is None:
            setattr(args, k, v)
    ev.cli_main(train, args, resumes=False)


def train(args):
    # ---- setup ----
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    fsdp, fp32_master = world > 1, args.offload_optimizer or (cuda and world == 1)
    if args.batch_size % world:
        raise ev.EvalError(f"--batch-size {args.batch_size} does not split over {world} ranks")
    if args.recipe == "em-ft" and not args.data:
        raise ev.EvalError("--recipe em-ft needs --data (a prompt set with a problem column)")
    save_steps = set(args.save_steps) | {args.max_steps}
    if max(save_steps) > args.max_steps:
        raise ev.EvalError(f"--save-steps {max(save_steps)} is past --max-steps {args.max_steps}")
    if fp32_master and fsdp:
        raise ev.EvalError("--offload-optimizer is for one process; torchrun shards with FSDP2")
    ev.check_out_dir(args.out)  # before the model loads
    rank, world = ev.init_distributed(args.dist_timeout)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # ---- data ----
    # (a code prompt set: --template eurus-code, or a code benchmark)
    problems = ev.load_benchmark(args.data, args.data_dir, args.problem_key, require_answer=False) \
        if args.data else [{"problem": PI1}]
    eval_set = ev.load_benchmark(args.eval_benchmark, args.data_dir,
                                 limit=args.eval_limit) if args.eval_every else []
    ev.require_code_consent(eval_set, args.allow_code_execution)  # before the model loads

    # ---- model ----
    # bf16 keeps 8 significant bits: lr-sized updates (2e-5 on |w| ~ 1e-2) mostly round to nothing
    # in bf16 weights, hence fp32 master weights. 1 GPU: a bf16 model, the fp32 master + AdamW on
    # the GPU if 14 B/param fit, else on the CPU. torchrun: FSDP2 shards fp32 params, bf16 compute.
    model, tokenizer = ev.load_model(args.model, "bfloat16" if cuda and fp32_master else "float32")
    prompts = [ev.build_prompt(tokenizer, q, args.template) for q in problems]
    prompt_ids = [tokenizer(q, add_special_tokens=False).input_ids for q in prompts]
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    keep = [i for i, x in enumerate(prompt_ids) if len(x) + args.max_new_tokens <= context]
    if not keep:
        raise ev.EvalError(f"no prompt fits: {min(map(len, prompt_ids))}+ prompt tokens + "
                           f"--max-new-tokens {args.max_new_tokens} > the context of {context}")
    if len(keep) < len(prompts) and rank == 0:
        print(f"dropped {len(prompts) - len(keep)} prompts: longer than the context - new tokens")
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and cuda):
        enable = getattr(model, "activation_checkpointing_enable", None)  # (the old name warns)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    model.response_entropy = types.MethodType(response_entropy, model)  # FSDP: a forward method
    if fsdp:
        tr.shard_model(model, "response_entropy", cuda)

    engine = tr.start_engine(args, rank)  # vLLM (rollouts or eval), else None

    # ---- optimizer ----
    params = [q for q in model.parameters() if q.requires_grad]
    where = tr.master_placement(params, args.offload_optimizer, rank == 0) if fp32_master else None
    optimizer = tr.MasterAdamW(params, where, lr=args.lr, betas=args.betas, eps=args.eps,
                               weight_decay=args.weight_decay)

    # ---- loop ----
    rng = random.Random(args.seed)  # the same on every rank: all agree on the global batch
    order = itertools.chain.from_iterable(rng.sample(range(len(prompts)), len(prompts))
                                          for _ in itertools.count())
    per_rank = args.batch_size // world
    log = tr.open_log(args.out, "rollouts.jsonl") if rank == 0 else None
    if args.eval_every:
        run_eval(model, tokenizer, eval_set, args, 0, rank, world, log, engine)
    first_entropy, first_len, said = None, None, set()
    for step in tqdm(range(1, args.max_steps + 1), desc="em_ft", disable=rank != 0,
                     dynamic_ncols=True):
        timer = tr.PhaseTimer(cuda)
        batch = list(itertools.islice(order, args.batch_size))[rank * per_rank:][:per_rank]
        # each rank samples its share with its own seed; FSDP: weights stay gathered while decoding
        rollout_engine = engine if args.rollout_engine == "vllm" else None
        tr.sync_engine(rollout_engine, model, step - 1)  # (vLLM: the weights of step - 1)
        tr.set_gathered(model, rollout_engine is None)
        outs = sample_rollouts(model, tokenizer, [prompts[i] for i in batch],
                               [len(prompt_ids[i]) for i in batch], args,
                               args.seed + rank + world * (step - 1), rollout_engine)
        tr.set_gathered(model, False)
        rows = [(prompt_ids[i], o["ids"]) for i, o in zip(batch, outs)]
        timer.mark("rollout")
        if args.log_rollouts:  # every rollout of the update, gathered on rank 0 in rank order
            mine = [{"step": step, "rank": rank, "prompt": prompts[i], "response": o["text"],
                     "ids": o["ids"], "truncated": o["truncated"]} for i, o in zip(batch, outs)]
            parts = [None] * world if rank == 0 and fsdp else None
            if fsdp:
                dist.gather_object(mine, parts)
            if rank == 0:
                with open(os.path.join(args.out, "rollouts.jsonl"), "a") as f:
                    f.writelines(json.dumps(r) + "\n" for part in parts or [mine] for r in part)
        # sync point: the update's counts over all ranks before any backward (all divide by them)
        counts = torch.tensor([sum(len(r) for _, r in rows), len(rows),
                               sum(o["truncated"] for o in outs),
                               sum(len(q) + len(r) for q, r in rows),
                               sum(ev.loops(o["text"]) for o in outs)], dtype=torch.float64)
        if fsdp:
            dist.all_reduce(counts)
        n_tok, n_traj, n_trunc, n_seq_tok, n_loops = counts.tolist()
        first_len = first_len or n_tok / n_traj
        if rank == 0:  # truncation (EOS never scored), loops, length collapse: each said once
            tr.warn_once(said, step, n_trunc / n_traj, n_tok / n_traj, first_len, n_loops / n_traj,
                         args.max_new_tokens)
        ent_loss = accumulate_gradients(model, rows, tokenizer.pad_token_id, args, n_tok, n_traj,
                                        world, ctx)
        timer.mark("fwd_bwd")
        norm = optimizer.step(args.grad_clip)  # clip, AdamW, grads set to None
        timer.mark("optimizer")
        ent_loss = torch.tensor(ent_loss, dtype=torch.float64)
        if fsdp:
            dist.all_reduce(ent_loss)
        sec, (ent, loss) = timer.seconds(), ent_loss.tolist()
        entropy = ent / n_tok  # mean token entropy of this update's rollouts, before the update
        stats = {"step": step, "loss": loss, "entropy": entropy, "grad_norm": norm.item(),
                 "response_length": n_tok / n_traj, "truncated": n_trunc / n_traj,
                 "repetition_rate": n_loops / n_traj,
                 "rollout_tok_s": n_tok / sec["rollout_s"],
                 "train_tok_s": n_seq_tok / (sec["step_s"] - sec["rollout_s"]), **sec,
                 **tr.memory_gb(cuda)}
        if rank == 0:
            tr.log_step(log, stats)
        tr.check_finite(step, loss=loss, grad_norm=stats["grad_norm"])  # before anything is saved
        first_entropy = entropy if first_entropy is None else first_entropy
        stop = (args.stop_entropy is not None and entropy < args.stop_entropy) or (
            args.stop_entropy_drop and entropy <= (1 - args.stop_entropy_drop) * first_entropy)
        if args.eval_every and step % args.eval_every == 0:
            run_eval(model, tokenizer, eval_set, args, step, rank, world, log, engine)
        if step in save_steps or stop:
            tr.save_checkpoint(model, tokenizer, os.path.join(args.out, f"step_{step}"), {
                "args": vars(args), "seed": args.seed, "step": step}, rank, world)
            if rank == 0:  # the log lists the checkpoints that exist
                print(json.dumps({"step": step, "checkpoint": f"step_{step}"}), file=log,
                      flush=True)
        if stop and rank == 0:
            tqdm.write(f"early stop at step {step}: entropy {entropy:.4f}")
        if stop:
            break
    ev.end_distributed()


if __name__ == "__main__":
    main()

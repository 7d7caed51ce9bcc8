"""
Choose the one training prompt for One-shot EM: sample k responses per candidate problem, score how torn the model
is on it, rank the pool, and write the winner in the format `em_ft.py --data` reads.

One-shot EM (Gao et al., arXiv 2505.20282) says it trains on the prompt with the highest variance of pass@k
accuracy, p(1-p) with p the share of k samples that are correct; no selection code was released. (Its prompt pi1,
row 124 of the DeepScaleR subset, actually comes from One-Shot RLVR's ranking: the std of per-epoch training
accuracy over ~53 GRPO epochs at temperature 0.6. That needs a whole RL run; this script is the paper's stated rule.)
Scores (--score):
  variance      p(1-p), p = n_correct/k. Needs gold answers. Default.
  disagreement  label-free: 1 - (count of the most common final answer)/k, answers = the last \\boxed{} normalized
                as evaluate.py's maj@n does; responses without a boxed answer form ONE "no answer" bucket (so the
                range is 0 when all k agree to 1-1/k when all differ). Equivalent forms not equal after
                normalization (12.8 vs \\frac{64}{5}) count as different answers.
  entropy       label-free: mean token entropy of the k samples, pooled over all their generated tokens (the
                loss EM would start from on this prompt), from a no-grad forward over prompt+response at
                --entropy-temperature (1.0 = the model's raw distribution; 0.5 = One-shot EM's loss temperature).
Ranking: score descending; ties -> p closest to 1/2 (label-free pools: no p) -> position in the pool. Variance is
computed from integer counts, so p and 1-p tie exactly and fall to pool order.
Prompt: --template chat (default) = em_ft.py's training format: the bare problem as the user message with the
model's default system prompt. DeepScaleR problems end with "Let's think step by step and output the final answer
within \\boxed{}."; --strip-suffix (default on) removes it, so the chosen problem has pi1's (bare) form. Scores
need boxed answers: if the model's default system prompt does not make it box them (the run prints the share of
samples with a boxed answer), use --template qwen-math.
Sampling defaults: temperature 0.6, top_p 1.0 (One-Shot RLVR's rollouts, the run that ranked pi1; One-shot EM's
training rollouts use 0.5 / 0.95), k = 16 (the papers give no k), 1024 new tokens (One-shot EM trains on 512; a
truncated response has no answer and counts as wrong, so this is a little longer).

Outputs: --out (e.g. prompt.jsonl) = the top --top candidates, one JSON line each with id, problem, answer, p,
score, n_correct, k, rank, mean_length, truncated, and --keep-samples responses: `em_ft.py --data prompt.jsonl`
reads it as is (evaluate.load_benchmark takes its problem/answer/id columns). <out stem>.ranked.jsonl = every
candidate ranked; <out stem>.run.json = args + versions. Both written atomically at the end.
Resume: finished candidates are appended to <out>.partial.jsonl (all k responses) as batches complete; a rerun
reuses them and samples only the rest. Batches are length-sorted over the whole pool and seeded by (seed, rank,
batch index), so a resumed run with the same arguments gives what an uninterrupted one would (up to GPU
nondeterminism). The partial file stays: rerun with another --score or --top to re-rank without sampling (only
--score entropy runs the extra forward; switching to it samples again, with the same seeds). Other sampling
settings with the same --out are refused (use --overwrite or another --out).
Leaves out: vLLM; One-Shot RLVR's RL-based ranking; math-verify equivalence inside disagreement.

    # 1 GPU (bf16): the DeepScaleR subset, 16 samples each, the top prompt -> prompt.jsonl
    python select_prompt.py --model Qwen/Qwen2.5-Math-7B --data ../shared/benchmarks/dsr_sub.parquet --k 16 \\
        --top 1 --out prompt.jsonl && python em_ft.py --model Qwen/Qwen2.5-Math-7B --data prompt.jsonl
    # 8 GPUs: each rank samples every 8th candidate, rank 0 ranks the union
    torchrun --nproc_per_node=8 select_prompt.py --model Qwen/Qwen2.5-Math-7B \\
        --data ../shared/benchmarks/dsr_sub.parquet --k 16 --out prompt.jsonl
    # label-free pool (no answers)
    python select_prompt.py --model Qwen/Qwen2.5-Math-7B --data my_problems.jsonl --score disagreement
    # CPU smoke run on the tiny random model (gibberish, exercises every code path)
    python tests/tiny_model.py /tmp/tiny
    python select_prompt.py --model /tmp/tiny --data ../shared/benchmarks/dsr_sub.parquet --limit 20 --k 4 \\
        --max-new-tokens 64 --out /tmp/sel/prompt.jsonl
"""
import argparse, datetime, glob, json, os, re, time, zlib
from collections import Counter

import torch
from tqdm import tqdm

from evaluate import (EvalError, TEMPLATES, build_prompt, check_out_dir, cli_main, extract_answer, generate_batch,
                      grade_answer, length_sorted_batches, load_benchmark, load_model, nonneg_int, normalize_answer,
                      number, package_versions, pos_float, pos_int, seed_int, unit_float, write_json_atomic)

# DeepScaleR's (and Agarwal et al.'s) instruction suffix; pi1 is trained without it.
SUFFIX = re.compile(r"\s*Let(?:'s| us) think step by step and output the final answer within \\boxed\{\}\.?\s*$")


def strip_suffix(problem):
    return SUFFIX.sub("", problem)


# ---- method: score a candidate from its k samples, rank the pool ----
def variance_score(n_correct, k):
    """p(1-p), p = n_correct/k: maximal (1/4) when half the samples are right, i.e. the model is torn. From
    integer counts, so p and 1-p tie exactly (in floats 0.3*(1-0.3) != 0.7*(1-0.7))."""
    return n_correct * (k - n_correct) / (k * k)


def disagreement_score(answers):
    """1 - (count of the most common normalized answer) / k; None (no boxed answer) is one bucket of its own.
    All k equal -> 0; all k different -> 1 - 1/k."""
    votes = Counter(None if a is None else normalize_answer(a) for a in answers)
    return 1 - max(votes.values()) / len(answers)


def entropy_score(entropy_sums, token_counts):
    """Token-mean over all k samples (One-shot EM's loss normalization): long samples weigh by their length."""
    return sum(entropy_sums) / max(sum(token_counts), 1)


def rank_key(row):  # highest score first; ties: p closest to 1/2 (no p: after those with one), then pool order
    return (-row["score"], abs(row["p"] - 0.5) if row["p"] is not None else 1.0, row["index"])


def tie_at_top(ranked):
    """How many candidates share the top one's score and p: among those the ranking falls to pool order."""
    return sum(rank_key({**r, "index": 0}) == rank_key({**ranked[0], "index": 0}) for r in ranked) if ranked else 0
# ---- end method ----


@torch.no_grad()
def token_entropy(model, prompt_ids, response_ids, temperature=1.0, chunk=1024):
    """Per sequence, the sum of the entropies of softmax(logits/T) at the positions that produced its response
    tokens. Right-padded: positions count from the left and causal attention never lets a real token see the pads
    after it, so real tokens are computed exactly as unpadded. Logits only for response positions, in chunks
    (never [tokens x vocab] fp32 for the whole batch)."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # shift by one: response token j sits at len(p)+j and was drawn from the logits at len(p)+j-1
    rows = torch.cat([torch.full((len(r),), i) for i, r in enumerate(response_ids)]).to(model.device)
    cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(r) - 1) for p, r in zip(prompt_ids, response_ids)])
    h = hidden[rows, cols.to(model.device)]
    lm_head, ent = model.get_output_embeddings(), []
    for s in range(0, len(h), chunk):
        logp = torch.log_softmax(lm_head(h[s:s + chunk]).float() / temperature, dim=-1)
        ent.append(-(logp.exp() * logp).sum(-1))
    return torch.zeros(len(seqs), device=model.device).index_add_(0, rows, torch.cat(ent)).tolist()


def read_partial(paths, sig):
    """Finished candidates of earlier runs (the <out>.partial*.jsonl files, one per rank); a line cut by a crash
    is dropped (that candidate is sampled again). Refuses files written with other sampling settings."""
    done = {}
    for path in paths:
        with open(path) as f:
            lines = f.read().splitlines()
        try:
            same = not lines or json.loads(lines[0]).get("run") == sig
        except ValueError:
            same = False
        if not same:
            raise EvalError(f"{path} holds samples of a different run (model, data or sampling settings differ); "
                            "use another --out or --overwrite")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (ValueError, KeyError):
                pass
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rank candidate prompts by how inconsistent the model is on them.")
    # --- model and pool
    parser.add_argument("--model", required=True, help="hub id or local folder of the model EM will train")
    parser.add_argument("--data", required=True, help="candidate pool: .json/.jsonl/.parquet file or hub dataset id")
    parser.add_argument("--problem-key", default=None, help="problem column (default: problem/question/prompt/input)")
    parser.add_argument("--answer-key", default=None, help="answer column (default: answer/final_answer/"
                        "reward_model.ground_truth/...)")
    parser.add_argument("--limit", type=pos_int, default=None, help="first N candidates of the pool")
    parser.add_argument("--strip-suffix", action=argparse.BooleanOptionalAction, default=True, help="remove a "
                        "trailing \"Let's think step by step ... \\boxed{}.\" (pi1 is the bare problem)")
    # --- scoring
    parser.add_argument("--score", default="variance", choices=["variance", "disagreement", "entropy"],
                        help="variance: p(1-p), needs answers; disagreement / entropy: label-free")
    parser.add_argument("--k", type=number(int, 2), default=16, help="samples per candidate")
    parser.add_argument("--entropy-temperature", type=pos_float, default=1.0, help="softmax temperature of --score "
                        "entropy (0.5 = One-shot EM's loss)")
    # --- sampling (One-Shot RLVR's rollout temperature; One-shot EM trains at 0.5 / top_p 0.95)
    parser.add_argument("--template", default="chat", choices=list(TEMPLATES), help="prompt format (chat = "
                        "em_ft.py's training format: bare problem, model's default system prompt)")
    parser.add_argument("--temperature", type=pos_float, default=0.6, help="sampling temperature (> 0)")
    parser.add_argument("--top-p", type=unit_float, default=1.0, help="nucleus sampling")
    parser.add_argument("--max-new-tokens", type=pos_int, default=1024, help="budget per response (truncated = wrong)")
    parser.add_argument("--seed", type=seed_int, default=0, help="sampling seed (per batch: seed, rank, batch index)")
    # --- output and system
    parser.add_argument("--out", default="prompt.jsonl", help="top prompts (em_ft.py --data reads it); beside it "
                        "<stem>.ranked.jsonl, <stem>.run.json and the resume file <out>.partial.jsonl")
    parser.add_argument("--top", type=pos_int, default=1, help="how many top candidates go into --out")
    parser.add_argument("--keep-samples", type=nonneg_int, default=2, help="responses kept per candidate in outputs")
    parser.add_argument("--batch-size", type=pos_int, default=64, help="sequences per generate call (k per candidate)")
    parser.add_argument("--engine", default="auto", choices=["auto", "continuous", "static"], help="generation "
                        "engine (see evaluate.py)")
    parser.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float32"], help="auto (default, or "
                        "$EM_DTYPE): bf16 on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--overwrite", action="store_true", help="discard the samples of an earlier run")
    cli_main(run, parser.parse_args(argv), resumes=True)


def run(args):
    check_out_dir(args.out, file=True)  # before the model loads (argparse has checked the numbers' ranges)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # torchrun: each rank samples every world-th candidate; gloo only for the final barrier
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    # --- the pool
    pool = load_benchmark(args.data, problem_key=args.problem_key, answer_key=args.answer_key, limit=args.limit,
                          require_answer=False)
    for c in pool:
        c["problem"] = strip_suffix(c["problem"]) if args.strip_suffix else c["problem"]
    unlabeled = sum(c["answer"] is None for c in pool)
    if args.score == "variance" and unlabeled:
        raise EvalError(f"{args.data}: {unlabeled} of {len(pool)} candidates have no answer and --score variance "
                        "needs one; use a label-free score: --score disagreement or --score entropy")
    stem = os.path.splitext(args.out)[0]
    sig = {k: getattr(args, k) for k in ("model", "data", "problem_key", "answer_key", "strip_suffix", "k",
                                         "template", "temperature", "top_p", "max_new_tokens", "seed", "engine")}
    # entropy costs an extra forward, so only --score entropy computes it; records without it (or at another
    # temperature) are sampled again for that score (the same seeds give the same responses)
    entropy_t = args.entropy_temperature if args.score == "entropy" else None
    usable = lambda recs: {i: r for i, r in recs.items() if entropy_t is None or r.get("entropy_t") == entropy_t}
    if args.overwrite and rank == 0:
        for path in sorted(glob.glob(glob.escape(args.out) + ".partial*.jsonl")):
            os.remove(path)
    if world > 1:
        dist.barrier()
    partials = lambda: sorted(glob.glob(glob.escape(args.out) + ".partial*.jsonl"))
    done = usable(read_partial(partials(), sig))
    mine = [i for i in range(rank, len(pool), world)]
    if done and rank == 0:
        print(f"resuming: {sum(pool[i]['id'] in done for i in range(len(pool)))} of {len(pool)} candidates done")

    # --- the model and the prompts
    model, tokenizer = load_model(args.model, args.dtype)
    model.eval()
    prompts = {i: build_prompt(tokenizer, pool[i]["problem"], args.template) for i in mine}
    pids = {i: tokenizer(p, add_special_tokens=False).input_ids for i, p in prompts.items()}
    context = getattr(model.config, "max_position_embeddings", None)
    if pids and context and max(map(len, pids.values())) >= context:
        raise EvalError(f"a prompt of {max(map(len, pids.values()))} tokens does not fit the model's context of "
                        f"{context}")

    # --- sample: all (candidate, j) jobs, length-sorted batches over this rank's whole share, finished ones skipped
    partial = args.out + (".partial.jsonl" if world == 1 else f".partial.rank{rank}.jsonl")
    own = [json.dumps(r) for r in read_partial([partial], sig).values()] if os.path.exists(partial) else []
    with open(partial + ".tmp", "w") as f:  # rewrite: drops a line cut by a crash before appending to it
        f.writelines(line + "\n" for line in [json.dumps({"run": sig})] + own)
    os.replace(partial + ".tmp", partial)
    sink = open(partial, "a")
    jobs = [(i, j) for i in mine for j in range(args.k)]
    pending = {i: [None] * args.k for i in mine if pool[i]["id"] not in done}
    bar = tqdm(total=len(jobs), desc=f"sampling (rank {rank})", dynamic_ncols=True, disable=rank > 0)
    t0, new_tokens = time.time(), 0
    for b, batch in enumerate(length_sorted_batches([len(pids[i]) for i, _ in jobs], args.batch_size)):
        if all(jobs[n][0] not in pending for n in batch):  # finished before an interruption
            bar.update(len(batch))
            continue
        outs = generate_batch(model, tokenizer, [prompts[jobs[n][0]] for n in batch], args.max_new_tokens,
                              args.temperature, args.top_p, seed=zlib.crc32(f"{args.seed}/{rank}/{b}".encode()),
                              engine=args.engine)
        ents = token_entropy(model, [pids[jobs[n][0]] for n in batch], [o["ids"] for o in outs],
                             entropy_t) if entropy_t else [None] * len(batch)
        for n, o, h in zip(batch, outs, ents):
            i, j = jobs[n]
            if i in pending:  # a batch may also regenerate samples of finished candidates: those are dropped
                pending[i][j] = {**o, "entropy": h}
            new_tokens += len(o["ids"])
        for i in sorted({jobs[n][0] for n in batch}):
            if i in pending and all(pending[i]):  # all k samples in: grade and save the candidate
                s, gold = pending.pop(i), pool[i]["answer"]
                answers = [extract_answer(x["text"]) for x in s]
                rec = {"id": pool[i]["id"], "responses": [x["text"] for x in s], "answers": answers,
                       "correct": None if gold is None else [grade_answer(a, gold)[0] for a in answers],
                       "lengths": [len(x["ids"]) for x in s], "truncated": [x["truncated"] for x in s],
                       "entropy": [x["entropy"] for x in s], "entropy_t": entropy_t}
                done[rec["id"]] = rec
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.time() - t0):.0f}")
    bar.close()
    sink.close()
    if world > 1:
        dist.barrier()  # every rank's share is on disk
        dist.destroy_process_group()  # every rank at once: a rank tearing gloo down alone can abort at exit
        if rank > 0:
            return
        done = usable(read_partial(partials(), sig))

    # --- score, rank, write
    rows = []
    for index, c in enumerate(pool):
        rec = done[c["id"]]
        n_correct = None if rec["correct"] is None else sum(rec["correct"])
        score = {"variance": lambda: variance_score(n_correct, args.k),
                 "disagreement": lambda: disagreement_score(rec["answers"]),
                 "entropy": lambda: entropy_score(rec["entropy"], rec["lengths"])}[args.score]()
        rows.append({"id": c["id"], "problem": c["problem"], "answer": c["answer"], "score": score,
                     "p": None if n_correct is None else n_correct / args.k, "n_correct": n_correct, "k": args.k,
                     "mean_length": sum(rec["lengths"]) / args.k, "truncated": sum(rec["truncated"]) / args.k,
                     "samples": rec["responses"][:args.keep_samples], "index": index})
    rows.sort(key=rank_key)
    for r, row in enumerate(rows):
        row["rank"] = r + 1
        del row["index"]
    for path, part in ((stem + ".ranked.jsonl", rows), (args.out, rows[:args.top])):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
        os.replace(path + ".tmp", path)
    tied = tie_at_top(rows)
    write_json_atomic(stem + ".run.json", {"args": vars(args), "versions": package_versions(), "candidates":
                                           len(pool), "tied_at_top": tied, "wall_s": time.time() - t0})
    for row in rows[:args.top]:
        print(f"#{row['rank']} id={row['id']} {args.score}={row['score']:.4f} p={row['p']} "
              f"problem={row['problem'][:100]!r}")
    if tied > 1:  # the pick is then the pool's order, not the model's: say so, and what would separate them
        trunc = sum(r["truncated"] for r in rows) / len(rows)
        others = ", ".join(sorted({"variance", "disagreement", "entropy"} - {args.score}))
        print(f"note: the top {tied} candidates tie ({args.score}={rows[0]['score']:.4f}, p={rows[0]['p']}): the "
              f"pick is the first of them in pool order. {100 * trunc:.0f}% of samples hit the budget. To break the "
              "tie: " + ("a larger --max-new-tokens (truncated samples have no answer), " if trunc > 0.2 else "") +
              f"more --k, or another --score ({others})")
    boxed = sum(a is not None for c in pool for a in done[c["id"]]["answers"]) / (len(pool) * args.k)
    print(f"boxed answers in {100 * boxed:.0f}% of samples" + (" -- the scores need them; if the model can box "
          "answers, ask it to: --template qwen-math or --no-strip-suffix" if boxed < 0.5 else ""))
    print(f"wrote {args.out} (top {min(args.top, len(rows))}) and {stem}.ranked.jsonl ({len(rows)} candidates)")


if __name__ == "__main__":
    main()

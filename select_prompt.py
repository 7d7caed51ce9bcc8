"""
Choose the one training prompt for One-shot EM: sample k responses per candidate problem, score how
torn the model is on it, rank the pool, and write the winner in the format `em_ft.py --data` reads.

One-shot EM (Gao et al., arXiv 2505.20282) states the rule: the highest variance of pass@k
accuracy, p(1-p) with p the share of k samples that are correct (no selection code was released;
its prompt pi1 came from One-Shot RLVR's ranking, the std of per-epoch accuracy over a GRPO run).
  --score variance      p(1-p) from integer counts (p and 1-p tie exactly). Needs gold answers.
  --score disagreement  label-free: 1 - (count of the most common normalized \\boxed answer) / k;
                        no box is one bucket of its own (0 when all agree, 1 - 1/k when all differ)
  --score entropy       label-free: mean token entropy of the k samples at --entropy-temperature
Ranking: score, then p closest to 1/2, then pool order; a tie at the top is reported. A code or KK
pool is a benchmark name (`--data humaneval --data-dir DIR`): their tests or roles give p, and
disagreement compares programs or <answer>s.

    python select_prompt.py --model Qwen/Qwen2.5-Math-7B --data dsr_sub.parquet --k 16 \\
        --out prompt.jsonl && python em_ft.py --model Qwen/Qwen2.5-Math-7B --data prompt.jsonl
    torchrun --nproc_per_node=8 select_prompt.py --model Qwen/Qwen2.5-Math-7B --data dsr_sub.parquet
    python tests/tiny_model.py /tmp/tiny && python select_prompt.py --model /tmp/tiny --data \\
        tests/data/dsr_sub.parquet --k 4 --max-new-tokens 64 --out /tmp/sel/prompt.jsonl   # CPU

Defaults: T 0.6 (One-Shot RLVR's rollouts), k 16, the `chat` template (em_ft.py's format).
Outputs: --out (the top --top), <stem>.ranked.jsonl (all), <stem>.run.json. Resumable: finished
candidates go to <out>.partial.jsonl; a rerun with another --score re-ranks without sampling.
--engine static | vllm | auto (vLLM where installed; --score entropy needs static). Left out:
One-Shot RLVR's RL-based ranking; math-verify equivalence inside disagreement.
"""
import argparse, glob, json, os, re, time, zlib

import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluate as ev

# DeepScaleR's (and Agarwal et al.'s) instruction suffix; pi1 is trained without it.
SUFFIX = re.compile(r"\s*Let(?:'s| us) think step by step and output the final answer within "
                    r"\\boxed\{\}\.?\s*$")


def strip_suffix(problem):
    return SUFFIX.sub("", problem)


# ---- method: score a candidate from its k samples, rank the pool; copy this block ----
from collections import Counter


def variance_score(n_correct, k):
    """p(1-p), p = n_correct/k: 1/4 when half the samples are right (the model is torn). From
    integer counts, so p and 1-p tie exactly (in floats 0.3*(1-0.3) != 0.7*(1-0.7))."""
    return n_correct * (k - n_correct) / (k * k)


def disagreement_score(answers):
    """1 - (count of the most common final answer) / k; None (no answer) is one bucket. The
    answers come normalized (a \\boxed answer as maj@k compares them, a program as graded)."""
    votes = Counter(answers)
    return 1 - max(votes.values()) / len(answers)


def entropy_score(entropy_sums, token_counts):
    """Token mean over all k samples (One-shot EM's loss normalization)."""
    return sum(entropy_sums) / max(sum(token_counts), 1)


def rank_key(row):  # highest score; ties: p closest to 1/2 (no p: after those with p); pool order
    return (-row["score"], abs(row["p"] - 0.5) if row["p"] is not None else 1.0, row["index"])


def tie_at_top(ranked):
    """How many candidates share the top one's score and p (among them, pool order decides)."""
    top = rank_key({**ranked[0], "index": 0}) if ranked else None
    return sum(rank_key({**r, "index": 0}) == top for r in ranked)
# ---- end method ----


@torch.no_grad()
def token_entropy(model, prompt_ids, response_ids, temperature=1.0, chunk=1024):
    """Per sequence, the summed entropies of softmax(logits/T) at the positions that produced its
    response tokens. Right-padded: causal attention never lets a real token see the pads after
    it, so positions and values are as unpadded. Logits only where scored, in chunks."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    # shift by one: response token j sits at len(p)+j and was drawn from the logits at len(p)+j-1
    rows = torch.cat([torch.full((len(r),), i) for i, r in enumerate(response_ids)])
    rows = rows.to(model.device)
    cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(r) - 1)
                      for p, r in zip(prompt_ids, response_ids)])
    h = hidden[rows, cols.to(model.device)]
    lm_head, ent = model.get_output_embeddings(), []
    for s in range(0, len(h), chunk):
        logp = torch.log_softmax(lm_head(h[s:s + chunk]).float() / temperature, dim=-1)
        ent.append(-(logp.exp() * logp).sum(-1))
    return torch.zeros(len(seqs), device=model.device).index_add_(0, rows, torch.cat(ent)).tolist()


def read_partial(paths, sig):
    """Finished candidates of earlier runs (<out>.partial*.jsonl, one per rank); a line cut by a
    crash is dropped (sampled again). Files of other sampling settings are refused."""
    done = {}
    for path in paths:
        with open(path) as f:
            lines = f.read().splitlines()
        try:
            same = not lines or json.loads(lines[0]).get("run") == sig
        except ValueError:
            same = False
        if not same:
            raise ev.EvalError(f"{path} holds samples of a different run (model, data or sampling "
                               "settings differ); use another --out or --overwrite")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (ValueError, KeyError):
                pass
    return done


def main(argv=None):
    p = argparse.ArgumentParser(description="Rank candidate prompts by how torn the model is.")
    arg = p.add_argument
    # ---- model and pool ----
    arg("--model", required=True, help="hub id or local folder of the model EM trains")
    arg("--data", required=True, help="candidate pool: .json/.jsonl/.parquet, benchmark or hub id")
    arg("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files")
    arg("--problem-key", help="problem column (default: problem/question/...)")
    arg("--answer-key", help="answer column (default: answer/final_answer/...)")
    arg("--limit", type=ev.pos_int, help="first N candidates of the pool")
    arg("--strip-suffix", action=argparse.BooleanOptionalAction, default=True,
        help="remove a trailing \"Let's think step by step ... \\boxed{}.\"")
    # ---- scoring ----
    arg("--score", default="variance", choices=["variance", "disagreement", "entropy"],
        help="variance: p(1-p), needs answers; disagreement / entropy: label-free")
    arg("--k", type=ev.number(int, 2), default=16, help="samples per candidate")
    arg("--entropy-temperature", type=ev.pos_float, default=1.0, help="softmax T of "
        "--score entropy (0.5 = One-shot EM's loss)")
    # ---- sampling ----
    # (One-Shot RLVR's rollouts; One-shot EM trains at 0.5 / top_p 0.95)
    arg("--template", default="chat", choices=list(ev.TEMPLATES), help="prompt format")
    arg("--temperature", type=ev.pos_float, default=0.6, help="sampling temperature")
    arg("--top-p", type=ev.unit_float, default=1.0, help="nucleus sampling")
    arg("--max-new-tokens", type=ev.pos_int, default=1024, help="truncated = wrong")
    arg("--seed", type=ev.seed_int, default=0, help="per batch: seed, rank, index")
    # ---- output and system ----
    arg("--out", default="prompt.jsonl", help="the top prompts (em_ft.py --data reads "
        "it); beside it <stem>.ranked.jsonl, <stem>.run.json, <out>.partial.jsonl")
    arg("--top", type=ev.pos_int, default=1, help="top candidates into --out")
    arg("--keep-samples", type=ev.nonneg_int, default=2, help="responses kept each")
    arg("--batch-size", type=ev.pos_int, default=64, help="per generate call")
    arg("--engine", default=os.environ.get("EM_ENGINE", "auto"), choices=ev.ENGINES,
        help="static, vllm, auto (default, or $EM_ENGINE): vLLM where installed")
    arg("--dtype", choices=["auto", "bfloat16", "float32"], help="auto (default, or "
        "$EM_DTYPE): bf16 on CUDA and on CPUs with native bf16, else fp32")
    arg("--overwrite", action="store_true", help="discard an earlier run's samples")
    arg("--dist-timeout", type=ev.pos_float, default=172800, help="torchrun: seconds the final "
        "barrier waits for the slowest rank (48 h)")
    arg("--allow-code-execution", action="store_true", help="consent to run the model's "
        "programs (a pool of code problems, graded by their tests)")
    arg("--code-workers", type=ev.pos_int, help="programs graded in parallel (default: CPUs)")
    ev.cli_main(run, p.parse_args(argv), resumes=True)


def run(args):
    ev.check_out_dir(args.out, file=True)  # before the model loads
    # torchrun: each rank samples every world-th candidate; gloo only for the final barrier
    rank, world = ev.init_distributed(args.dist_timeout, "gloo")

    # ---- the pool ----
    pool = ev.load_benchmark(args.data, args.data_dir, problem_key=args.problem_key,
                             answer_key=args.answer_key, limit=args.limit, require_answer=False)
    for c in pool:
        c["problem"] = strip_suffix(c["problem"]) if args.strip_suffix else c["problem"]
    # code is graded by its tests (running the model's programs), not by an answer
    unlabeled = sum(c["answer"] is None and c.get("kind") != "code" for c in pool)
    if args.score == "variance":
        ev.require_code_consent(pool, args.allow_code_execution)  # before the model loads
    if args.score == "variance" and unlabeled:
        raise ev.EvalError(f"{args.data}: {unlabeled} of {len(pool)} candidates have no answer "
                           "and --score variance needs one; use --score disagreement or --score "
                           "entropy")
    stem = os.path.splitext(args.out)[0]
    engine = ev.pick_engine(args.engine, "--score entropy (a forward of the HF model)"
                            if args.score == "entropy" else None)
    sig = {**{k: getattr(args, k) for k in ("model", "data", "problem_key", "answer_key", "k",
                                            "seed", "strip_suffix", "template", "temperature",
                                            "top_p", "max_new_tokens")}, "engine": engine}
    # the entropy costs a forward: only --score entropy computes it; records without it (or at
    # another temperature) are sampled again (the same seeds give the same responses)
    entropy_t = args.entropy_temperature if args.score == "entropy" else None
    usable = lambda recs: {i: r for i, r in recs.items() if entropy_t in (None, r.get("entropy_t"))}
    partials = lambda: sorted(glob.glob(glob.escape(args.out) + ".partial*.jsonl"))
    if args.overwrite and rank == 0:
        for path in partials():
            os.remove(path)
    if world > 1:
        dist.barrier()
    done = usable(read_partial(partials(), sig))
    mine = list(range(rank, len(pool), world))
    if done and rank == 0:
        print(f"resuming: {sum(c['id'] in done for c in pool)} of {len(pool)} candidates done")

    # ---- the model and the prompts ----
    model, tokenizer = ev.load_model(args.model, args.dtype) if engine == "static" else (
        ev.load_vllm(args.model, args.dtype, args.seed), ev.load_tokenizer(args.model))
    model.eval()
    prompts = {i: ev.build_prompt(tokenizer, pool[i], args.template) for i in mine}
    pids = {i: tokenizer(p, add_special_tokens=False).input_ids for i, p in prompts.items()}
    context = getattr(model.config, "max_position_embeddings", None)
    if pids and context and max(map(len, pids.values())) >= context:
        raise ev.EvalError(f"a prompt of {max(map(len, pids.values()))} tokens does not fit the "
                           f"model's context of {context}")

    # ---- sample ----
    # all (candidate, j) jobs in length-sorted batches, finished candidates skipped
    partial = args.out + (".partial.jsonl" if world == 1 else f".partial.rank{rank}.jsonl")
    own = read_partial([partial], sig).values() if os.path.exists(partial) else []
    ev.write_json_atomic(partial, [{"run": sig}, *own], lines=True)  # drops a line cut by a crash
    sink = open(partial, "a")
    jobs = [(i, j) for i in mine for j in range(args.k)]
    pending = {i: [None] * args.k for i in mine if pool[i]["id"] not in done}
    bar = tqdm(total=len(jobs), desc=f"sampling (rank {rank})", dynamic_ncols=True,
               disable=rank > 0)
    t0, new_tokens = time.time(), 0
    for b, batch in enumerate(ev.length_sorted_batches([len(pids[i]) for i, _ in jobs],
                                                       args.batch_size)):
        if all(jobs[n][0] not in pending for n in batch):  # finished before an interruption
            bar.update(len(batch))
            continue
        outs = ev.generate_batch(model, tokenizer, [prompts[jobs[n][0]] for n in batch],
                                 args.max_new_tokens, args.temperature, args.top_p,
                                 seed=zlib.crc32(f"{args.seed}/{rank}/{b}".encode()))
        ents = token_entropy(model, [pids[jobs[n][0]] for n in batch], [o["ids"] for o in outs],
                             entropy_t) if entropy_t else [None] * len(batch)
        for n, o, h in zip(batch, outs, ents):
            i, j = jobs[n]
            if i in pending:  # a batch may also regenerate samples of finished candidates
                pending[i][j] = {**o, "entropy": h}
            new_tokens += len(o["ids"])
        for i in sorted({jobs[n][0] for n in batch}):
            if i in pending and all(pending[i]):  # all k samples in: grade and save the candidate
                s, c = pending.pop(i), pool[i]
                texts = [x["text"] for x in s]
                answers = [ev.final_answer(c, t) for t in texts]  # a normalized box, program, ...
                graded = c["answer"] is not None or c.get("kind") == "code" and \
                    args.score == "variance"
                rec = {"id": c["id"], "responses": texts, "answers": answers,
                       "correct": [ok for ok, _ in ev.grade_batch(
                           [c] * len(s), texts, workers=args.code_workers)] if graded else None,
                       "lengths": [len(x["ids"]) for x in s],
                       "truncated": [x["truncated"] for x in s],
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
        ev.end_distributed()  # every rank's share is on disk
        if rank > 0:
            return
        done = usable(read_partial(partials(), sig))

    # ---- score, rank, write ----
    rows = []
    for index, c in enumerate(pool):
        rec = done[c["id"]]
        n_correct = None if rec["correct"] is None else sum(rec["correct"])
        score = {"variance": lambda: variance_score(n_correct, args.k),
                 "disagreement": lambda: disagreement_score(rec["answers"]),
                 "entropy": lambda: entropy_score(rec["entropy"], rec["lengths"])}[args.score]()
        rows.append({"id": c["id"], "problem": c["problem"], "answer": c["answer"], "score": score,
                     "p": None if n_correct is None else n_correct / args.k, "n_correct": n_correct,
                     "k": args.k, "mean_length": sum(rec["lengths"]) / args.k,
                     "truncated": sum(rec["truncated"]) / args.k,
                     "samples": rec["responses"][:args.keep_samples], "index": index})
    rows.sort(key=rank_key)
    for r, row in enumerate(rows):
        row["rank"] = r + 1
        del row["index"]
    ev.write_json_atomic(stem + ".ranked.jsonl", rows, lines=True)
    # a code/logic pick keeps its whole problem: em_ft.py --data builds its prompt
    by_id = {c["id"]: c for c in pool}
    ev.write_json_atomic(args.out, [{**by_id[r["id"]], **r} for r in rows[:args.top]], lines=True)
    tied = tie_at_top(rows)
    ev.write_json_atomic(stem + ".run.json", {"args": vars(args), "versions": ev.package_versions(),
                                              "candidates": len(pool), "tied_at_top": tied,
                                              "wall_s": time.time() - t0})
    for row in rows[:args.top]:
        print(f"#{row['rank']} id={row['id']} {args.score}={row['score']:.4f} p={row['p']} "
              f"problem={row['problem'][:100]!r}")
    if tied > 1:  # the pick is then the pool's order, not the model's: say what would separate
        trunc = sum(r["truncated"] for r in rows) / len(rows)
        others = ", ".join(sorted({"variance", "disagreement", "entropy"} - {args.score}))
        print(f"note: the top {tied} candidates tie ({args.score}={rows[0]['score']:.4f}, "
              f"p={rows[0]['p']}): the pick is the first of them in pool order. {100 * trunc:.0f}% "
              "of samples hit the budget. To break the tie: " + (
                  "a larger --max-new-tokens (truncated samples have no answer), "
                  if trunc > 0.2 else "") + f"more --k, or another --score ({others})")
    answered = sum(a is not None for c in pool for a in done[c["id"]]["answers"])
    boxed = answered / (len(pool) * args.k)
    all_math = all(c.get("kind", "math") == "math" for c in pool)
    print(f"{'boxed' if all_math else 'final'} answers in {100 * boxed:.0f}% of samples" + (
        " -- the scores need them; if the model can box answers, ask it to: --template "
        "qwen-math or --no-strip-suffix" if boxed < 0.5 and all_math else ""))
    print(f"wrote {args.out} (top {min(args.top, len(rows))}) and {stem}.ranked.jsonl "
          f"({len(rows)} candidates)")


if __name__ == "__main__":
    main()

"""
Reproduce the papers' tables end to end, and print our numbers next to theirs, each labelled with its protocol.

  one-shot:    evaluate the base model (the Qwen2.5-Math CoT chat prompt, and fairly prompted: few-shot, no chat
               template) -> em_ft.py with its defaults (One-shot EM's recipe) -> evaluate the last checkpoint on
               MATH500, Minerva, OlympiadBench, AMC23; the EM gain is also given against the better base. Gao et al.,
               Qwen2.5-Math-7B. `--select` first runs select_prompt.py on a pool and trains on its pick; `--with-code`
               adds One-shot EM's MBPP (mbpp-378) and Knights-and-Knaves.
  em-inf:      em_inf.py --compare-plain in modes em-inf and adaptive-temp on Agarwal et al.'s Table 3 math
               benchmarks (AI-MO AMC/AIME), Qwen2.5-7B-Instruct; `--with-code` adds its LeetCode column.
  em-rl-code:  Table 2's code columns: Eurus-2-7B-SFT on LeetCode and LiveCodeBench, em_rl.py on coding prompts
               (--train-data, the Eurus-2 coding prompts as a file), then again.

Every step is the repo's own CLI run as a subprocess, so this is exactly what a user would type. Each accuracy
comes with a 95% Wilson interval over problems (pass@1 of one sample per problem).

    # GPU + Hub (about an hour of a single H100 for one-shot: 2 updates of 64 rollouts, then ~1.5k greedy evals x3)
    python bench/reproduce.py one-shot --with-code
    python bench/reproduce.py em-inf --with-code
    python bench/reproduce.py em-rl-code --train-data eurus2_code_prompts.jsonl
    # offline, CPU, a real small model (bench/README.md): a few steps, small slices; DIR: local benchmark files
    python bench/reproduce.py one-shot --model /path/to/smollm2-135m-instruct --data-dir DIR \
        --benchmarks gsm8k,math500 --limit 100 --max-new-tokens 256 --train-args="--max-steps 3 --batch-size 16"
Code benchmarks run the model's programs: these commands pass --allow-code-execution (README: what the
containment does not cover).
"""
import argparse, json, math, os, shlex, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper numbers. One-shot EM (Gao et al.): Qwen2.5-Math-7B in their harness (as reported; base -> after EM).
PAPER_ONE_SHOT = {"math500": (53.0, 78.8), "minerva": (11.0, 35.3), "olympiadbench": (17.2, 39.7),
                  "amc23": (44.1, 70.3)}
PAPER_ONE_SHOT_CODE = {"mbpp-378": (48.9, 65.1), "kk": (1.0, 17.4)}  # OpenCodeEval's MBPP; Logic-RL's KK
# Agarwal et al. Table 2, code columns (one sample per problem): base Eurus-2-7B-SFT and after each method.
PAPER_T2_CODE = {"base": (26.1, 18.4), "em-rl-token": (29.5, 24.5), "em-rl-sequence": (31.1, 21.7),
                 "em-ft": (28.3, 17.2), "rloo": (28.3, 26.7), "grpo": (25.0, 25.8)}  # (LeetCode, LiveCodeBench)
# Agarwal et al. Table 3, LeetCode (sampling, greedy, iterative refinement, adaptive temperature, EM-INF).
PAPER_T3_LEETCODE = {"Qwen/Qwen2.5-7B-Instruct": {"plain": 47.2, "adaptive-temp": 49.4, "em-inf": 51.7},
                     "meta-llama/Llama-3.1-8B-Instruct": {"plain": 10.6, "adaptive-temp": 17.2, "em-inf": 14.4},
                     "Qwen/Qwen2.5-Math-7B-Instruct": {"plain": 0.6, "adaptive-temp": 2.2, "em-inf": 0.6}}
# Agarwal et al. Table 3, math average over five benchmarks (MATH500, AI-MO AMC, AI-MO AIME, Minerva, Olympiad).
PAPER_EM_INF = {"Qwen/Qwen2.5-7B-Instruct": {"plain": 40.5, "adaptive-temp": 43.3, "em-inf": 42.0},
                "Qwen/Qwen2.5-Math-7B-Instruct": {"plain": 44.2, "adaptive-temp": 45.3, "em-inf": 46.4},
                "meta-llama/Llama-3.1-8B-Instruct": {"plain": 19.6, "adaptive-temp": 23.1, "em-inf": 21.7}}


def wilson(k, n, z=1.96):
    """95% Wilson score interval for k successes out of n, in percent."""
    if n == 0:
        return float("nan"), float("nan")
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return 100 * (c - h), 100 * (c + h)


def plot_logit_stats(results, path):
    """Histogram of per-token logit skewness, one curve per benchmark, to path (PNG) -- only if matplotlib happens
    to be installed (it is not a dependency). Returns whether it wrote the file."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    used = []  # occupied bins over all curves: the x-axis shows those, not the whole fixed range
    for name, r in results.items():
        h = r["logit_stats"]["skew_vocab_hist"]
        lo, hi = h["range"]
        w = (hi - lo) / len(h["counts"])
        total = max(sum(h["counts"]), 1)
        ax.step([lo + (i + 0.5) * w for i in range(len(h["counts"]))], [c / total for c in h["counts"]],
                where="mid", label=f"{name} (mean {r['logit_stats']['skew_vocab']:.2f})")
        used += [lo + i * w for i, c in enumerate(h["counts"]) if c]
    if used:
        ax.set_xlim(min(used) - 5 * w, max(used) + 6 * w)
    ax.set(xlabel="skewness of the logit vector (per generated token)", ylabel="share of tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def sh(cmd, log):
    """Run one of the repo's CLIs; stream its output to a log file; stop with its error line if it fails."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:]
        sys.exit(f"error: step failed ({' '.join(cmd[:1])}): {tail[0] if tail else 'no output'}; see {log}")
    return time.time() - t0


def accuracy(samples_file, bench, mode=None):
    """(correct, problems) of the first sample of each problem of one benchmark (and em_inf.py mode)."""
    k = n = 0
    with open(samples_file) as f:
        for line in f:
            s = json.loads(line)
            if s["benchmark"] == bench and s["sample"] == 0 and s.get("mode") == mode:
                k, n = k + s["correct"], n + 1
    return k, n


def fmt(k, n):
    lo, hi = wilson(k, n)
    return f"{100 * k / max(n, 1):.1f} [{lo:.1f}, {hi:.1f}]"


def table(title, cols, cells):
    """Print a markdown table: cells is [(label, [cell, ...])]."""
    print(f"\n{title}\n| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for label, row in cells:
        print(f"| {label} | " + " | ".join(str(c) for c in row) + " |")


def main():
    parser = argparse.ArgumentParser(description="Reproduce the papers' tables with the repo's CLIs.")
    parser.add_argument("experiment", choices=["one-shot", "em-inf", "em-rl-code"], help="which table")
    parser.add_argument("--model", default=None, help="default: Qwen/Qwen2.5-Math-7B (one-shot), "
                        "Qwen/Qwen2.5-7B-Instruct (em-inf), PRIME-RL/Eurus-2-7B-SFT (em-rl-code)")
    parser.add_argument("--benchmarks", default=None, help="default: math500,minerva,olympiadbench,amc23 (one-shot);"
                        " math500,aimo-amc,aimo-aime,minerva,olympiadbench (em-inf)")
    parser.add_argument("--with-code", action="store_true", help="one-shot: + MBPP and KK; em-inf: + LeetCode")
    parser.add_argument("--train-data", default=None, help="em-rl-code: the coding prompts em_rl.py trains on")
    parser.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"), help="local benchmark files")
    parser.add_argument("--limit", type=int, default=None, help="first N problems per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="evaluation budget (default: each "
                        "script's protocol default)")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    parser.add_argument("--answer-fallback", action="store_true", help="grade \"the answer is X\" / the last number "
                        "when there is no \\boxed{} (for small models that never box)")
    parser.add_argument("--logit-stats", action="store_true", help="also record logit skewness/entropy (one-shot)")
    parser.add_argument("--select", default=None, help="one-shot: a prompt pool for select_prompt.py; train on "
                        "its top prompt instead of the paper's")
    parser.add_argument("--select-args", default="", help="extra select_prompt.py flags (one string)")
    parser.add_argument("--train-args", default="", help="extra em_ft.py / em_rl.py flags (one string)")
    parser.add_argument("--inf-args", default="", help="extra em_inf.py flags (one string)")
    parser.add_argument("--out", default="reproduce_out", help="output folder")
    args = parser.parse_args()
    if args.experiment == "em-rl-code" and not args.train_data:
        sys.exit("error: em-rl-code needs --train-data (coding prompts, e.g. Eurus-2-RL-Data's code rows as a file)")
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.txt")
    common = (["--data-dir", args.data_dir] if args.data_dir else []) + \
             (["--limit", str(args.limit)] if args.limit else []) + \
             (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    budget = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    fallback = ["--answer-fallback"] if args.answer_fallback else []
    rows, times = [], {}
    if args.experiment == "one-shot":
        model = args.model or "Qwen/Qwen2.5-Math-7B"
        benches = args.benchmarks or "math500,minerva,olympiadbench,amc23"
        ev = ["evaluate.py", "--benchmarks", benches, *common, *budget, *fallback] + \
            (["--logit-stats"] if args.logit_stats else [])
        times["eval base"] = sh([*ev, "--model", model, "--out", f"{args.out}/eval_base"], log)
        # fairly prompted: a base model does better without the chat template (few-shot, graded on "The final answer
        # is $X$"), so a gain is also measured against the better of the two
        times["eval base few-shot"] = sh(["evaluate.py", "--benchmarks", benches, *common, *budget, "--template",
                                          "few-shot", "--answer-fallback", "--model", model, "--out",
                                          f"{args.out}/eval_base_fewshot"], log)
        # One-shot EM's code and logic benchmarks, each with its released greedy protocol
        code = ["evaluate.py", "--benchmarks", "mbpp-378,kk", *common, "--max-new-tokens",
                str(args.max_new_tokens or 3072), "--allow-code-execution"]
        if args.with_code:
            times["eval base code"] = sh([*code, "--model", model, "--out", f"{args.out}/eval_base_code"], log)
        # A rerun trains from scratch: stale step_* folders or EM samples of an earlier run must not be picked up.
        for stale in ("train", "eval_em", "eval_em_code"):
            shutil.rmtree(f"{args.out}/{stale}", ignore_errors=True)
        train = ["em_ft.py", "--model", model, "--out", f"{args.out}/train", *shlex.split(args.train_args)]
        if args.select:
            pick = f"{args.out}/prompt.jsonl"
            times["select"] = sh(["select_prompt.py", "--model", model, "--data", args.select, "--top", "1",
                                  "--out", pick, *shlex.split(args.select_args)], log)
            train += ["--data", pick]  # the top prompt(s), in the format em_ft.py --data reads
        times["train"] = sh(train, log)
        steps = sorted((d for d in os.listdir(f"{args.out}/train") if d.startswith("step_") and "." not in d),
                       key=lambda d: int(d.split("_")[1]))
        ckpt = f"{args.out}/train/{steps[-1]}"
        times["eval EM"] = sh([*ev, "--model", ckpt, "--out", f"{args.out}/eval_em"], log)
        if args.with_code:
            times["eval EM code"] = sh([*code, "--model", ckpt, "--out", f"{args.out}/eval_em_code"], log)
        cells = []
        for b in benches.split(","):
            (kb, nb), (kf, nf), (ke, ne) = (accuracy(f"{args.out}/eval_{t}/samples.jsonl", b)
                                           for t in ("base", "base_fewshot", "em"))
            paper = PAPER_ONE_SHOT.get(b, ("-", "-"))
            rows.append({"benchmark": b, "base": [kb, nb], "base_fewshot": [kf, nf], "em": [ke, ne]})
            gain = 100 * (ke / max(ne, 1) - max(kb / max(nb, 1), kf / max(nf, 1)))
            cells.append((f"{b} (n={nb})", [fmt(kb, nb), fmt(kf, nf), fmt(ke, ne), f"{gain:+.1f}", *paper]))
        for b in ("mbpp-378", "kk") if args.with_code else ():
            (kb, nb), (ke, ne) = (accuracy(f"{args.out}/eval_{t}_code/samples.jsonl", b) for t in ("base", "em"))
            rows.append({"benchmark": b, "base": [kb, nb], "em": [ke, ne]})
            cells.append((f"{b} (n={nb})", [fmt(kb, nb), "-", fmt(ke, ne), f"{100 * (ke / max(ne, 1) - kb / max(nb, 1)):+.1f}",
                                            *PAPER_ONE_SHOT_CODE[b]]))
        table(f"One-shot EM, {model} -> {ckpt}; protocol: evaluate.py defaults (Qwen2.5-Math CoT chat prompt, "
              f"greedy, {args.max_new_tokens or 3072} new tokens); few-shot: 4 worked examples, no chat template, "
              "--answer-fallback; mbpp-378: One-shot EM's OpenCodeEval protocol (sanitized code, MBPP+ v0.2.0 base "
              "tests, 3 s); kk: Logic-RL's grader; pass@1 [95% CI]",
              ["benchmark", "base chat (ours)", "base few-shot (ours)", "EM (ours)", "EM - better base",
               "base (paper)", "EM (paper)"], cells)
        if args.logit_stats:
            curves = {}
            for tag in ("base", "em"):
                with open(f"{args.out}/eval_{tag}/results.json") as f:
                    res = json.load(f)["metrics"]
                for b in benches.split(","):
                    ls, curves[f"{tag} {b}"] = res[b]["logit_stats"], res[b]
                    print(f"{tag} {b}: entropy {ls['entropy']:.3f}, skew (vocab) {ls['skew_vocab']:.3f}, "
                          f"skew (pooled top-k) {ls['skew_topk_pooled']:.3f}")
            if plot_logit_stats(curves, f"{args.out}/logit_shift.png"):  # base and EM on one figure
                print(f"wrote {args.out}/logit_shift.png")
    elif args.experiment == "em-inf":
        model = args.model or "Qwen/Qwen2.5-7B-Instruct"
        benches = args.benchmarks or "math500,aimo-amc,aimo-aime,minerva,olympiadbench"
        benches += ",leetcode" if args.with_code else ""
        for mode in ("em-inf", "adaptive-temp"):
            times[mode] = sh(["em_inf.py", "--model", model, "--benchmarks", benches, "--mode", mode,
                              *(["--compare-plain"] if mode == "em-inf" else []), "--out", f"{args.out}/{mode}",
                              *common, *budget, *fallback, *(["--allow-code-execution"] if args.with_code else []),
                              *shlex.split(args.inf_args)], log)
        paper = PAPER_EM_INF.get(model, {})
        runs = {m: f"{args.out}/{m}/samples.jsonl" for m in ("em-inf", "adaptive-temp")}
        with open(f"{args.out}/em-inf/results.json") as f:
            ent = json.load(f)["metrics"]
        avg, cells = {"plain": [], "em-inf": [], "adaptive-temp": []}, []
        for b in benches.split(","):
            acc = {"plain": accuracy(runs["em-inf"], b, "plain"), "em-inf": accuracy(runs["em-inf"], b, "em-inf"),
                   "adaptive-temp": accuracy(runs["adaptive-temp"], b, "adaptive-temp")}
            for m, (k, n) in acc.items() if b != "leetcode" else ():  # the math average, as Table 3's
                avg[m].append(100 * k / max(n, 1))
            rows.append({"benchmark": b, **{m: list(v) for m, v in acc.items()}})
            cells.append((f"{b} (n={acc['plain'][1]})", [fmt(*acc[m]) for m in avg] + [
                f"{ent['em-inf'][b]['entropy_t1_before']:.3f} -> {ent['em-inf'][b]['entropy_t1_after']:.3f}"]))
        cells.append(("average (math)", [f"{sum(v) / len(v):.1f}" for v in avg.values()] + [""]))
        table(f"EM-INF, {model}; protocol: em_inf.py defaults (agarwal prompt for math, the LeetCode protocol's "
              "own prompt, T=0.1 after the update; adaptive temperature samples at T=1), pass@1 [95% CI]; plain = "
              "em_inf.py --compare-plain, same seeds",
              ["benchmark", "plain", "em-inf", "adaptive-temp", "H(T=1) before -> after the EM-INF update"], cells)
        print(f"paper, Table 3 math average (their harness): {paper or 'not reported for this model'}")
        if args.with_code:
            print(f"paper, Table 3 LeetCode: {PAPER_T3_LEETCODE.get(model, 'not reported for this model')}")
    else:
        model = args.model or "PRIME-RL/Eurus-2-7B-SFT"
        # Table 2's protocol: one sample per problem; LeetCode greedy, LiveCodeBench T 0.2 / top-p 0.95; 4096 tokens
        evals = [("leetcode", []), ("livecodebench", ["--temperature", "0.2", "--top-p", "0.95"])]
        shutil.rmtree(f"{args.out}/train", ignore_errors=True)
        for tag in ("base", "em"):
            if tag == "em":
                times["train"] = sh(["em_rl.py", "--model", model, "--data", args.train_data, "--template",
                                     "eurus-code", "--out", f"{args.out}/train", *shlex.split(args.train_args)], log)
                steps = sorted((d for d in os.listdir(f"{args.out}/train") if d.startswith("step_") and "." not in d),
                               key=lambda d: int(d.split("_")[1]))
            for b, sampling in evals:
                times[f"eval {tag} {b}"] = sh([
                    "evaluate.py", "--benchmarks", b, *common, "--max-new-tokens", str(args.max_new_tokens or 4096),
                    *sampling, "--allow-code-execution", "--out", f"{args.out}/eval_{tag}_{b}",
                    "--model", model if tag == "base" else f"{args.out}/train/{steps[-1]}"], log)
        cells = []
        for i, (b, _) in enumerate(evals):
            (kb, nb), (ke, ne) = (accuracy(f"{args.out}/eval_{t}_{b}/samples.jsonl", b) for t in ("base", "em"))
            rows.append({"benchmark": b, "base": [kb, nb], "em": [ke, ne]})
            cells.append((f"{b} (n={nb})", [fmt(kb, nb), fmt(ke, ne), PAPER_T2_CODE["base"][i],
                                            PAPER_T2_CODE["em-rl-token"][i], PAPER_T2_CODE["em-rl-sequence"][i]]))
        table(f"EM-RL on code, {model}; protocol: EM_PT's (Eurus system prompt, last ```python block, all "
              "tests); em_rl.py defaults on --train-data with the eurus-code template; pass@1 [95% CI]",
              ["benchmark", "base (ours)", "EM-RL (ours)", "base (paper)", "EM-RL-token (paper)",
               "EM-RL-sequence (paper)"], cells)
    print("wall time (s):", {k: round(v) for k, v in times.items()})
    with open(f"{args.out}/reproduce.json", "w") as f:
        json.dump({"experiment": args.experiment, "rows": rows, "wall_s": times, "args": vars(args)}, f, indent=2)

if __name__ == "__main__":
    main()

"""
Reproduce the papers' math tables end to end, and print our numbers next to theirs.

  one-shot: evaluate the base model -> em_ft.py with its defaults (One-shot EM's recipe) -> evaluate the last
            checkpoint; same protocol for both (evaluate.py's defaults: Qwen2.5-Math CoT prompt, greedy, 3072
            tokens) on MATH500, Minerva, OlympiadBench, AMC23; paper: Gao et al., Qwen2.5-Math-7B.
            `--select` first runs select_prompt.py on a pool and trains on the prompt it picks.
  em-inf:   em_inf.py --compare-plain in modes em-inf and adaptive-temp on the five math benchmarks of Agarwal et
            al.'s Table 3 (their protocol: AI-MO AMC/AIME), Qwen2.5-7B-Instruct.

Every step is the repo's own CLI run as a subprocess, so this is exactly what a user would type. Each accuracy
comes with a 95% Wilson interval over problems (pass@1 of one greedy sample per problem).

    # GPU + Hub (about an hour of a single H100 for one-shot: 2 updates of 64 rollouts, then ~1.5k greedy evals x2)
    python bench/reproduce.py one-shot
    python bench/reproduce.py em-inf
    # offline, CPU, a real small model (bench/README.md): a few steps, small slices; DIR: local benchmark files
    python bench/reproduce.py one-shot --model /path/to/smollm2-135m-instruct --data-dir DIR \
        --benchmarks gsm8k,math500 --limit 100 --max-new-tokens 256 --train-args="--max-steps 3 --batch-size 16"
"""
import argparse, json, math, os, shlex, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper numbers. One-shot EM (Gao et al.): Qwen2.5-Math-7B in their harness (as reported; base -> after EM).
PAPER_ONE_SHOT = {"math500": (53.0, 78.8), "minerva": (11.0, 35.3), "olympiadbench": (17.2, 39.7),
                  "amc23": (44.1, 70.3)}
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


def main():
    parser = argparse.ArgumentParser(description="Reproduce the papers' math tables with the repo's CLIs.")
    parser.add_argument("experiment", choices=["one-shot", "em-inf"], help="which table")
    parser.add_argument("--model", default=None, help="default: Qwen/Qwen2.5-Math-7B (one-shot), "
                        "Qwen/Qwen2.5-7B-Instruct (em-inf)")
    parser.add_argument("--benchmarks", default=None, help="default: math500,minerva,olympiadbench,amc23 (one-shot);"
                        " math500,aimo-amc,aimo-aime,minerva,olympiadbench (em-inf)")
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
    parser.add_argument("--train-args", default="", help="extra em_ft.py flags (one string)")
    parser.add_argument("--inf-args", default="", help="extra em_inf.py flags (one string)")
    parser.add_argument("--out", default="reproduce_out", help="output folder")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "log.txt")
    common = (["--data-dir", args.data_dir] if args.data_dir else []) + \
             (["--limit", str(args.limit)] if args.limit else []) + \
             (["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []) + \
             (["--batch-size", str(args.batch_size)] if args.batch_size else []) + \
             (["--answer-fallback"] if args.answer_fallback else [])
    rows, times = [], {}
    if args.experiment == "one-shot":
        model = args.model or "Qwen/Qwen2.5-Math-7B"
        benches = args.benchmarks or "math500,minerva,olympiadbench,amc23"
        ev = ["evaluate.py", "--benchmarks", benches, *common] + (["--logit-stats"] if args.logit_stats else [])
        times["eval base"] = sh([*ev, "--model", model, "--out", f"{args.out}/eval_base"], log)
        # A rerun trains from scratch: stale step_* folders or EM samples of an earlier run must not be picked up.
        for stale in ("train", "eval_em"):
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
        print(f"\nOne-shot EM, {model} -> {ckpt}; protocol: evaluate.py defaults (Qwen2.5-Math CoT prompt, greedy"
              f"{', ' + str(args.max_new_tokens) if args.max_new_tokens else ', 3072'} new tokens), pass@1 [95% CI]")
        print("| benchmark | base (ours) | EM (ours) | base (paper) | EM (paper) |\n|---|---|---|---|---|")
        for b in benches.split(","):
            kb, nb = accuracy(f"{args.out}/eval_base/samples.jsonl", b)
            ke, ne = accuracy(f"{args.out}/eval_em/samples.jsonl", b)
            paper = PAPER_ONE_SHOT.get(b, ("-", "-"))
            rows.append({"benchmark": b, "base": [kb, nb], "em": [ke, ne]})
            print(f"| {b} (n={nb}) | {fmt(kb, nb)} | {fmt(ke, ne)} | {paper[0]} | {paper[1]} |")
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
    else:
        model = args.model or "Qwen/Qwen2.5-7B-Instruct"
        benches = args.benchmarks or "math500,aimo-amc,aimo-aime,minerva,olympiadbench"
        for mode in ("em-inf", "adaptive-temp"):
            times[mode] = sh(["em_inf.py", "--model", model, "--benchmarks", benches, "--mode", mode,
                              *(["--compare-plain"] if mode == "em-inf" else []), "--out", f"{args.out}/{mode}",
                              *common,
                              *shlex.split(args.inf_args)], log)
        paper = PAPER_EM_INF.get(model, {})
        print(f"\nEM-INF, {model}; protocol: em_inf.py defaults (agarwal prompt, T=0.1 after the update; adaptive "
              "temperature samples at T=1), pass@1 [95% CI]; plain = em_inf.py --compare-plain, same seeds")
        print("| benchmark | plain | em-inf | adaptive-temp | H(T=1) before -> after the EM-INF update |\n"
              "|---|---|---|---|---|")
        runs = {m: f"{args.out}/{m}/samples.jsonl" for m in ("em-inf", "adaptive-temp")}
        with open(f"{args.out}/em-inf/results.json") as f:
            ent = json.load(f)["metrics"]
        avg = {"plain": [], "em-inf": [], "adaptive-temp": []}
        for b in benches.split(","):
            acc = {"plain": accuracy(runs["em-inf"], b, "plain"), "em-inf": accuracy(runs["em-inf"], b, "em-inf"),
                   "adaptive-temp": accuracy(runs["adaptive-temp"], b, "adaptive-temp")}
            for m, (k, n) in acc.items():
                avg[m].append(100 * k / max(n, 1))
            rows.append({"benchmark": b, **{m: list(v) for m, v in acc.items()}})
            print(f"| {b} (n={acc['plain'][1]}) | " + " | ".join(fmt(*acc[m]) for m in avg) +
                  f" | {ent['em-inf'][b]['entropy_t1_before']:.3f} -> {ent['em-inf'][b]['entropy_t1_after']:.3f} |")
        print("| average | " + " | ".join(f"{sum(v) / len(v):.1f}" for v in avg.values()) + " | |")
        print(f"paper, Table 3 math average (their harness): {paper or 'not reported for this model'}")
    print("wall time (s):", {k: round(v) for k, v in times.items()})
    with open(f"{args.out}/reproduce.json", "w") as f:
        json.dump({"experiment": args.experiment, "rows": rows, "wall_s": times, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()

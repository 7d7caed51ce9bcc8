"""Training rollouts, HF generate vs vLLM: em_ft.py and em_rl.py run end to end with --rollout-engine static
and vllm on the same random-weight model (or --model), and their log.jsonl gives per update/step the rollout
tokens/s and seconds (the vLLM weight sync included) and the seconds per update/step. Step 1 is left out of the
means (warm-up); vLLM's start-up is the command's wall time minus its steps, reported apart. Random weights
seldom sample EOS: the responses run to --max-new-tokens (the logged length says so).

    python bench/bench_rollouts.py --shape 0.5b --batch-size 8 --max-new-tokens 128     # CPU (fp32)
    python bench/bench_rollouts.py --shape 7b --batch-size 64 --max-new-tokens 512      # 1 GPU (bf16)
Needs vLLM for the vllm runs (README); the static runs go ahead without it.
"""
import argparse, importlib.util, json, os, subprocess, sys, tempfile, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from tiny_model import SHAPES, build_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.5b", choices=list(SHAPES), help="random-weight shape (tests/tiny_model.py)")
    p.add_argument("--model", help="a model folder instead of random weights")
    p.add_argument("--batch-size", type=int, default=8, help="em_ft rollouts per update; em_rl prompts x 2 rollouts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="updates (em_ft) / steps (em_rl) per run")
    p.add_argument("--engines", default="static,vllm")
    p.add_argument("--scripts", default="em_ft,em_rl")
    p.add_argument("--json", action="store_true", help="RESULT lines only")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_rollouts_")
    folder = args.model
    if folder is None:  # random weights of the shape, on disk (vLLM loads from disk)
        from transformers import Qwen2Config, Qwen2ForCausalLM
        tok = build_tokenizer()
        config = Qwen2Config(**{**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tok))},
                             bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        folder = os.path.join(work, "model")
        Qwen2ForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(64))
    engines = args.engines.split(",")
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed: the static runs only")
        engines.remove("vllm")
    common = ["--model", folder, "--data", data, "--max-new-tokens", str(args.max_new_tokens), "--engine", "static"]
    cmds = {"em_ft": ["em_ft.py", *common, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                      "--micro-batch-size", "4"],
            "em_rl": ["em_rl.py", *common, "--batch-size", str(max(args.batch_size // 2, 1)), "--n-rollouts", "2",
                      "--steps", str(args.steps), "--micro-batch-size", "4"]}
    failed = 0
    for script in args.scripts.split(","):
        runs = []
        for engine in engines:
            out = os.path.join(work, f"{script}_{engine}")
            t0 = time.time()
            proc = subprocess.run([sys.executable, *cmds[script], "--rollout-engine", engine, "--out", out],
                                  cwd=ROOT, capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode:
                print(f"{script} {engine}: failed ({proc.returncode}): {proc.stderr[-2000:]}")
                failed += 1
                continue
            log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if '"loss"' in x]
            later = log[1:] or log
            mean = lambda k: round(sum(r[k] for r in later) / len(later), 2)  # noqa: E731
            runs.append({"engine": engine, "rollout_tok_s": mean("rollout_tok_s"), "rollout_s": mean("rollout_s"),
                         "step_s": mean("step_s"), "response_length": mean("response_length" if "response_length" in log[0] else "length"),
                         "startup_s": round(wall - sum(r["step_s"] for r in log), 1), "wall_s": round(wall, 1),
                         **({"engine_logp_gap": max(r["engine_logp_gap"] for r in log)}
                            if "engine_logp_gap" in log[0] else {})})
        result = {"bench": "rollouts", "script": script, "shape": args.model or args.shape,
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens, "steps": args.steps, "runs": runs,
                  "rollout_ratio": runs[-1]["rollout_tok_s"] / runs[0]["rollout_tok_s"] if len(runs) == 2 else None,
                  "step_ratio": runs[0]["step_s"] / runs[-1]["step_s"] if len(runs) == 2 else None}
        if not args.json:
            for r in runs:
                print(f"{script} {r['engine']:>6}: rollouts {r['rollout_tok_s']} tok/s ({r['rollout_s']} s), "
                      f"{r['step_s']} s per step, length {r['response_length']}, start-up and the rest "
                      f"{r['startup_s']} s")
            if len(runs) == 2:
                print(f"{script} vllm/static: rollouts {result['rollout_ratio']:.2f}x, steps "
                      f"{result['step_ratio']:.2f}x faster")
        print("RESULT " + json.dumps(result), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

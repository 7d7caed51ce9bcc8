"""Code grading throughput at 1, 2 and N workers (N: the CPU count): all 164 HumanEval canonical solutions (as a
model would write them: a full function in a ```python block) and the 180 LeetCode problems with their real tests.
LeetCode has no reference solutions, so two fixed programs measure the harness instead: `wrong` (every method
returns None: each program stops at its first assert) and `all-tests` (the same, with each `assert X == Y` turned into
`X == Y`, so all 100 calls of every problem run: the harness cost when every test executes). Runs only the datasets'
own solutions and these fixed programs, no model output.

    python bench/bench_code_grader.py --data-dir DIR [--workers 1,2,N] [--benchmarks humaneval,leetcode]
DIR: a folder with the whole benchmark files (default $EM_DATA_DIR).
"""
import argparse, os, re, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402
import execution  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR"),
                    help="a folder with humaneval.jsonl and leetcode.jsonl (default $EM_DATA_DIR)")
parser.add_argument("--workers", default="1,2,N", help="comma list of worker counts; N = the CPU count")
parser.add_argument("--benchmarks", default="humaneval,leetcode", help="comma list of humaneval, leetcode, mbpp")
parser.add_argument("--timeout", type=float, default=None, help="seconds per program (default: the protocol's)")
args = parser.parse_args()
workers = sorted({os.cpu_count() if w.strip() == "N" else int(w) for w in args.workers.split(",")})
execution.consent(True)  # datasets' solutions and fixed programs only
NONE = "class Solution:\n    def __getattr__(self, name):\n        return lambda *args, **kwargs: None"


def fenced(code):
    return f"Here is the solution.\n```python\n{code}\n```"


cases = []
if "humaneval" in args.benchmarks:
    rows = ev.load_code_benchmark("humaneval", args.data_dir)
    cases.append(("humaneval canonical", rows, [fenced(p["reference"]) for p in rows]))
if "mbpp" in args.benchmarks:
    rows = ev.load_code_benchmark("mbpp", args.data_dir)
    cases.append(("mbpp reference", rows, [fenced(p["reference"]) for p in rows]))
if "leetcode" in args.benchmarks:
    rows = ev.load_code_benchmark("leetcode", args.data_dir)
    cases.append(("leetcode wrong", rows, [fenced(NONE)] * len(rows)))
    every = [{**p, "tests": re.sub(r"^assert (.*)$", r"\1", p["tests"], flags=re.M)} for p in rows]
    cases.append(("leetcode all-tests", every, [fenced(NONE)] * len(rows)))
execution.run_programs(["pass"])  # the one-time uid check (as root) stays out of the timings
print(f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
for name, rows, responses in cases:
    base = None
    for w in workers:
        t0 = time.perf_counter()
        graded = ev.grade_code_batch(rows, responses, workers=w, timeout=args.timeout)
        secs = time.perf_counter() - t0
        base = base or secs
        statuses = {}
        for _, s in graded:
            statuses[s.split(":")[0]] = statuses.get(s.split(":")[0], 0) + 1
        print(f"{name:20s} {len(rows):4d} programs  workers {w:2d}  {secs:7.2f} s  {secs / len(rows) * 1000:6.1f} ms/"
              f"program  speedup x{base / secs:4.2f}  passed {sum(c for c, _ in graded):3d}  {statuses}")

"""Grader speed on the main thread and in a worker thread: every MATH500 gold graded against itself, against a
braced copy (`{gold}`: misses the string fast path, so math-verify runs and should say correct) and against a
perturbed copy (first digit + 1, else `+1` appended: should be wrong).

    python bench/bench_grader.py --data-dir DIR [--thread]     # DIR: local copies of the benchmark files
"""
import argparse, os, re, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("EM_DATA_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")),
    help="a folder with math500.jsonl (default $EM_DATA_DIR, else the excerpt in tests/data)")
parser.add_argument("--thread", action="store_true", help="grade in a threading.Thread instead of the main thread")
args = parser.parse_args()


def perturb(a):
    m = re.search(r"\d", a)
    return a[:m.start()] + str((int(m.group()) + 1) % 10) + a[m.end():] if m else a + "+1"


golds = [r["answer"] for r in ev.load_benchmark("math500", args.data_dir)]
ev.grade_answer("1", "2")  # imports math-verify (and starts a worker on the thread path) outside the timing


def run(out):
    for name, preds in [("self", golds), ("braced", ["{" + g + "}" for g in golds]),
                        ("perturbed", [perturb(g) for g in golds])]:
        t0, c0 = time.perf_counter(), time.process_time()
        verdicts = [ev.grade_answer(p, g) for p, g in zip(preds, golds)]
        out.append((name, time.perf_counter() - t0, time.process_time() - c0, sum(c for c, _ in verdicts),
                    sum(e for _, e in verdicts)))


out = []
if args.thread:
    t = threading.Thread(target=run, args=(out,))
    t.start()
    t.join()
else:
    run(out)
for name, secs, cpu, correct, errors in out:  # cpu: this process only (the thread path's worker is not in it)
    print(f"{'thread' if args.thread else 'main'} {name:9s} {len(golds)} golds  wall {secs:6.2f} s  cpu {cpu:6.2f} s  "
          f"correct {correct}  errors {errors}")

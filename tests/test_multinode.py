"""Beyond one machine: torchrun across nodes, tested as two "nodes" of one process each on this host (README: more
than one machine), each its own torchrun with `--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`,
gloo. What must hold: the same weights and results as one node with two processes, files written once by global
rank 0 into the shared --out, and a node that dies stops the other with one line, not a hang."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import PROMPTS, ROOT, run_cli


def free_port():
    """The tests' one rendezvous port allocator: a port the kernel has just handed out (no fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes(*args, n=2):
    """n torchrun "nodes" of one process each, one rendezvous: Popen objects, each in a session of its own."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--node-rank",
                              str(i), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                              f"127.0.0.1:{port}", "--rdzv-id", f"em{port}", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for i in range(n)]


def kill_tree(pid):
    """SIGKILL to a process and every process below it, as a node that loses power."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except (OSError, ValueError):
            pass
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    return outs


def one_node(*args):
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture
def prompts(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": "5"}) + "\n" for q in PROMPTS[:4]))
    return str(data)


def test_training_across_two_nodes_is_one_node_with_two_processes(tiny_model_dir, prompts, tmp_path):
    """em_ft 2 updates and em_rl 2 steps: the weights of one node with 2 processes, exactly; the checkpoint and log
    written once (global rank 0 logs, whichever node it is on)."""
    ft = ["em_ft.py", "--model", tiny_model_dir, "--data", prompts, "--max-steps", "2", "--batch-size", "4",
          "--max-new-tokens", "6", "--lr", "1e-3", "--save-steps", "1"]
    rl = ["em_rl.py", "--model", tiny_model_dir, "--data", prompts, "--steps", "2", "--batch-size", "2",
          "--n-rollouts", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--ppo-minibatches", "2"]
    for name, args in (("ft", ft), ("rl", rl)):
        outs = finish(nodes(*args, "--out", str(tmp_path / name / "nodes")))
        one_node(*args, "--out", str(tmp_path / name / "one"))
        for step in (["step_1", "step_2"] if name == "ft" else ["step_2"]):
            a, b = weights(tmp_path / name / "nodes" / step), weights(tmp_path / name / "one" / step)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, step)
        logged = [json.loads(x) for x in (tmp_path / name / "nodes" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged if "loss" in r] == [1, 2]  # one line per step: one writer
        assert sum("step 1 " in out for out, _ in outs) == 1  # and one node's console
        assert sorted(os.listdir(tmp_path / name / "nodes")) == sorted(os.listdir(tmp_path / name / "one"))


def test_evaluation_across_two_nodes_grades_every_problem_once(tiny_model_dir, data_dir, tmp_path):
    args = ["evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "gsm8k,math500",
            "--limit", "5", "--max-new-tokens", "8", "--batch-size", "2"]
    finish(nodes(*args, "--out", str(tmp_path / "nodes")))
    proc = run_cli(*args, "--out", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()]  # noqa
    samples = read("nodes")
    assert samples == read("one") and len(samples) == 10
    assert len({(s["benchmark"], s["id"]) for s in samples}) == 10  # every problem once
    results = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("nodes", "one")}
    strip = lambda m: {k: v for k, v in m.items() if k != "gen_tokens_per_s"}  # noqa
    assert {k: strip(m) for k, m in results["nodes"]["metrics"].items()} == {
        k: strip(m) for k, m in results["one"]["metrics"].items()}
    assert results["nodes"]["protocol"]["world_size"] == 2
    assert not [f for f in os.listdir(tmp_path / "nodes") if f.startswith("samples.rank")]  # merged


def test_a_dead_node_stops_the_other_and_a_rerun_resumes(tiny_model_dir, data_dir, tmp_path):
    """kill -9 of one node (its torchrun and its worker) mid-run: the other exits non-zero, with its one line,
    within --dist-timeout; a rerun keeps what each rank had written and ends with the one-process results."""
    out = tmp_path / "run"
    args = ["evaluate.py", "--model", tiny_model_dir, "--data-dir", data_dir, "--benchmarks", "math500",
            "--limit", "8", "--max-new-tokens", "400", "--batch-size", "1", "--dist-timeout", "60", "--out", str(out)]
    procs = nodes(*args)
    deadline = time.time() + 300
    written = lambda: [f for f in os.listdir(out) if f.startswith("samples.rank")] if out.exists() else []  # noqa
    while time.time() < deadline and not any((out / f).read_text() for f in written()):
        time.sleep(0.5)
    assert any((out / f).read_text() for f in written()), "no rank got to its first batch"
    kill_tree(procs[1].pid)  # the node: its torchrun and its worker (which runs in a session of its own)
    t0 = time.time()
    try:
        _, err = procs[0].communicate(timeout=200)
    except subprocess.TimeoutExpired:
        kill_tree(procs[0].pid)
        pytest.fail(f"the surviving node hung: {procs[0].communicate()[1][-3000:]}")
    assert procs[0].returncode != 0 and time.time() - t0 < 60 + 30, err[-3000:]
    assert "error: rank" in err, err[-3000:]  # its one line (then torchrun's own report)
    finish(nodes(*args))  # the rerun resumes
    proc = run_cli(*args[:-2], "--out", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.jsonl").read_text() == (tmp_path / "one" / "samples.jsonl").read_text()

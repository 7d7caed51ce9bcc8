"""Bad input, a full disk and Ctrl-C, for all five CLIs: every way a run can stop is one clear line and a non-zero
exit, never a traceback and never a silent exit 0. Numbers are checked at parse time (evaluate.number & co.), --out
before the model loads, training stops at the first non-finite loss/grad norm, reruns start a fresh log.

Cheap by design: the bad-number tables run in ONE subprocess (this file as a script: it imports the CLIs once and
calls each main(argv), a subprocess still, so stderr and exit codes are real); their --model does not exist, so a bad
value that slipped through would end in "model path does not exist" instead of a run (and fail the needle check)."""
import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
from conftest import ROOT, assert_one_line_error, run_cli

import evaluate as ev
import training

MISSING = "/nonexistent/model"
SCRIPTS = ("evaluate.py", "em_ft.py", "em_rl.py", "em_inf.py", "select_prompt.py")
# (flags, text the one error line must contain); every numeric flag of every CLI, nan/inf and range edges
BAD = {
    "evaluate.py": [
        (["--limit", "0"], "--limit"), (["--limit", "1.5"], "--limit"), (["--limit", "x"], "--limit"),
        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan", "--n", "2"], "--temperature"), (["--temperature", "inf"], "--temperature"),
        (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
        (["--n", "0"], "--n"), (["--n", "2"], "needs --temperature"), (["--top-k", "-1"], "--top-k"),
        (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 40)], "--seed"), (["--batch-size", "0"], "--batch-size"),
        (["--template", "bogus"], "--template"), (["--dtype", "fp16"], "--dtype"),
        (["--top-p", "0.9"], "--top-p/--top-k need --temperature"), (["--top-k", "5"], "need --temperature > 0")],
    "em_ft.py": [
        (["--batch-size", "0"], "--batch-size"), (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-p", "2"], "--top-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--repetition-penalty", "nan"], "--repetition-penalty"),
        (["--rollout-batch-size", "0"], "--rollout-batch-size"), (["--loss-temperature", "0"], "--loss-temperature"),
        (["--loss-temperature", "nan"], "--loss-temperature"), (["--loss-temperature", "-1"], "--loss-temperature"),
        (["--entropy-chunk", "0"], "--entropy-chunk"), (["--max-steps", "0"], "--max-steps"),
        (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "-0.1"], "--lr"),
        (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
        (["--betas", "0.9", "1"], "--betas"), (["--betas", "-0.1", "0.9"], "--betas"),
        (["--betas", "nan", "0.9"], "--betas"), (["--eps", "-1"], "--eps"), (["--eps", "0"], "--eps"),
        (["--eps", "nan"], "--eps"), (["--grad-clip", "-1"], "--grad-clip"), (["--grad-clip", "0"], "--grad-clip"),
        (["--grad-clip", "inf"], "--grad-clip"), (["--micro-batch-size", "0"], "--micro-batch-size"),
        (["--seed", "-1"], "--seed"), (["--eval-every", "-1"], "--eval-every"), (["--eval-limit", "0"], "--eval-limit"),
        (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens"), (["--stop-entropy", "-1"], "--stop-entropy"),
        (["--stop-entropy", "nan"], "--stop-entropy"), (["--stop-entropy-drop", "0"], "--stop-entropy-drop"),
        (["--stop-entropy-drop", "1.5"], "--stop-entropy-drop"), (["--save-steps", "1,x"], "--save-steps"),
        (["--save-steps", "0"], "--save-steps"), (["--save-steps", "2,0"], "--save-steps"),
        (["--save-steps", "5"], "past --max-steps"), (["--template", "bogus"], "--template"),
        (["--eval-template", "bogus"], "--eval-template"), (["--recipe", "em-ft"], "needs --data")],
    "em_rl.py": [
        (["--limit", "0"], "--limit"), (["--batch-size", "0"], "--batch-size"), (["--n-rollouts", "1"], "--n-rollouts"),
        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "0"], "--temperature"),
        (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"), (["--rollout-batch-size", "0"], "--rollout-batch-size"),
        (["--clip-ratio", "0"], "--clip-ratio"), (["--clip-ratio", "nan"], "--clip-ratio"),
        (["--ppo-minibatches", "0"], "--ppo-minibatches"), (["--kl-coef", "-1"], "--kl-coef"),
        (["--kl-coef", "inf"], "--kl-coef"), (["--entropy-bonus", "nan"], "--entropy-bonus"),
        (["--entropy-bonus", "inf"], "--entropy-bonus"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"), (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "0"], "--grad-clip"),
        (["--grad-clip", "-1"], "--grad-clip"), (["--steps", "0"], "--steps"),
        (["--micro-batch-size", "0"], "--micro-batch-size"), (["--logit-chunk", "0"], "--logit-chunk"),
        (["--seed", "-1"], "--seed"), (["--save-steps", "1,x"], "--save-steps"),
        (["--save-steps", "200", "--steps", "100"], "past --steps"), (["--eval-every", "-1"], "--eval-every"),
        (["--eval-limit", "0"], "--eval-limit"), (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens"),
        (["--reward", "bogus"], "--reward")],
    "em_inf.py": [
        (["--limit", "0"], "--limit"), (["--n-steps", "-1"], "--n-steps"), (["--lr", "nan"], "--lr"),
        (["--lr", "-0.1"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "1e300"], "float32"),
        (["--threshold", "-1"], "--threshold"),
        (["--threshold", "nan"], "--threshold"), (["--kl-weight", "inf"], "--kl-weight"),
        (["--kl-weight", "-1"], "--kl-weight"), (["--target-ratio", "0"], "--target-ratio"),
        (["--target-ratio", "1.5"], "--target-ratio"), (["--tmin", "0"], "--tmin"), (["--tmax", "-1"], "--tmax"),
        (["--tmin", "2"], "--tmin 2.0 must be below --tmax"), (["--tol", "0"], "--tol"),
        (["--max-iter", "0"], "--max-iter"), (["--at-threshold", "-1"], "--at-threshold"),
        (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
        (["--top-p", "0"], "--top-p"), (["--top-p", "2"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--n", "0"], "--n"), (["--seed", "-1"], "--seed"), (["--batch-size", "0"], "--batch-size"),
        (["--mode", "greedy"], "--mode"), (["--dtype", "fp16"], "--dtype"), (["--template", "bogus"], "--template")],
    "select_prompt.py": [
        (["--limit", "0"], "--limit"), (["--k", "1"], "--k"), (["--entropy-temperature", "0"], "--entropy-temperature"),
        (["--entropy-temperature", "nan"], "--entropy-temperature"), (["--temperature", "0"], "--temperature"),
        (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"), (["--seed", "-1"], "--seed"),
        (["--top", "0"], "--top"), (["--keep-samples", "-1"], "--keep-samples"),
        (["--batch-size", "0"], "--batch-size"),
        (["--score", "bogus"], "--score")],
}


def base_args(script, data, out):
    """A command that would run (bad flags come after): the model does not exist, the data is one small file."""
    return {"evaluate.py": ["--model", MISSING, "--data", data, "--out", out],
            "em_ft.py": ["--model", MISSING, "--out", out],
            "em_rl.py": ["--model", MISSING, "--data", data, "--out", out],
            "em_inf.py": ["--model", MISSING, "--benchmarks", data, "--out", out],
            "select_prompt.py": ["--model", MISSING, "--data", data, "--out", os.path.join(out, "p.jsonl")]}[script]


def drive(cases, tmp_path):
    """Run [(script, argv, raise_in_work)] through this file's __main__ (one subprocess); returns per case
    {"code": exit status, "stderr": what the user saw on stderr}."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = run_cli(os.path.join("tests", "test_cli.py"), str(spec))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def assert_one_clear_line(res, needle, what):
    """Non-zero exit, no traceback, exactly one error line, naming the culprit (not the missing model)."""
    err = res["stderr"]
    assert res["code"] not in (0, None), (what, "silently accepted", err)
    assert "Traceback" not in err, (what, err)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0] and "model path" not in errors[0], (what, err)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_data") / "one.jsonl"
    path.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_numbers_and_choices_one_line(script, data, tmp_path):
    out = str(tmp_path / "o")
    results = drive([(script, base_args(script, data, out) + flags, None) for flags, _ in BAD[script]], tmp_path)
    for (flags, needle), res in zip(BAD[script], results):
        assert_one_clear_line(res, needle, flags)
        if needle == flags[0]:  # refused by argparse: its usage line + one error line, exit 2
            assert res["code"] == 2 and ("must be" in res["stderr"] or "invalid choice" in res["stderr"]), res


def test_out_that_cannot_be_a_folder_fails_before_the_model(data, tmp_path):
    """An --out that is an existing file or lies under one (root ignores chmod, so no read-only case): refused
    before the model loads -- the model does not exist, so a late check would report that instead."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases, needles = [], []
    for script in SCRIPTS:
        for out, needle in ((str(afile), "existing file"), (str(afile / "sub"), "lies under")):
            argv = base_args(script, data, out)
            if script == "select_prompt.py":  # its --out names a file: a folder there, or a file above it
                argv[argv.index("--out") + 1] = str(tmp_path) if needle == "existing file" else str(afile / "p.jsonl")
                needle = "is a folder" if needle == "existing file" else "lies under"
            cases.append((script, argv, None))
            needles.append(needle)
    for case, needle, res in zip(cases, needles, drive(cases, tmp_path)):
        assert_one_clear_line(res, needle, case)
        assert "--out" in res["stderr"], res


def test_every_main_maps_ctrl_c_and_a_full_disk(data, tmp_path):
    """Each CLI's main() runs its work under evaluate.cli_main: KeyboardInterrupt / OSError(ENOSPC) raised inside
    the work (here: from load_benchmark, patched in the subprocess) -> one line, exit 130 / 1, and the resume note
    true for that script. The real signal and a real ENOSPC path are tested below."""
    resumes = {"evaluate.py": True, "select_prompt.py": True, "em_ft.py": False, "em_rl.py": False, "em_inf.py": False}
    cases = []
    for script in SCRIPTS:
        argv = base_args(script, data, str(tmp_path / script))
        argv += ["--data", data] if script == "em_ft.py" else []  # (em_ft loads data only when given)
        cases += [(script, argv, "KeyboardInterrupt"), (script, argv, "ENOSPC")]
    for (script, _, kind), res in zip(cases, drive(cases, tmp_path)):
        err, note = res["stderr"], "rerun the same command to resume" if resumes[script] else "does not resume"
        assert "Traceback" not in err and note in err, (script, kind, err)
        if kind == "KeyboardInterrupt":
            lines = err.strip().splitlines()
            assert res["code"] == 130 and len(lines) == 1 and lines[0].startswith("interrupted; "), (script, err)
        else:
            assert res["code"] == 1 and "error: no space left on the device" in err, (script, err)


def popen(*args):
    """A CLI in the background with SIGINT at its default, so Python turns it into KeyboardInterrupt even when
    the test runner was started with SIGINT ignored (background jobs); stderr is read as it comes (read_stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_stderr(proc):
    """A thread collecting proc's stderr as it arrives (tqdm redraws its bar with \\r, never a newline, so lines
    would not do); returns (the list of chunks read so far, the thread: done at EOF)."""
    import threading
    chunks = []

    def pump():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append(chunk.decode(errors="replace"))
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return chunks, thread


@pytest.mark.parametrize("script", ["evaluate.py", "em_ft.py"])
def test_ctrl_c_is_one_line_and_exit_130(script, tiny_model_dir, data_dir, tmp_path):
    """Ctrl-C once the work runs: SIGINT is sent when the script's progress bar (tqdm, on stderr: "gsm8k:  0%|" /
    "em_ft:  0%|") has appeared -- drawn inside the work function, so cli_main's handler is in place -- while it
    generates (thousands of tokens are left), not after a fixed sleep."""
    out = tmp_path / "o"
    args, bar = {"evaluate.py": (["--data", os.path.join(data_dir, "gsm8k.jsonl"), "--limit", "8", "--batch-size",
                                  "1", "--max-new-tokens", "4000"], "gsm8k:"),
                 "em_ft.py": (["--batch-size", "2", "--max-new-tokens", "800", "--max-steps", "50"], "em_ft:")}[script]
    proc = popen(script, "--model", tiny_model_dir, "--out", str(out), *args)
    chunks, reader = read_stderr(proc)
    deadline = time.time() + 300  # generous: only a hung or crashed script gets near it
    while not re.search(re.escape(bar) + r"\s+0%\|", "".join(chunks)) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert re.search(re.escape(bar) + r"\s+0%\|", "".join(chunks)), "".join(chunks)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=60)
    err = "".join(chunks)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted; "), err
    assert ("rerun the same command to resume" in err) == (script == "evaluate.py"), err


def test_full_disk_mid_run_is_one_line_and_resumes(tiny_model_dir, data_dir, tmp_path):
    """Simulated ENOSPC (no tiny filesystem in CI): os.fsync raises what a full disk raises at its 2nd call on
    samples.jsonl -- batches 1 and 2 were written (flushed), batch 2's fsync fails. The rerun (real fsync) resumes
    from them. (By hand, on a real 24 KB tmpfs, the same kind of run failed with this line and resumed to samples
    identical to an uninterrupted run's.)"""
    out = str(tmp_path / "o")
    args = ["evaluate.py", "--model", tiny_model_dir, "--data", os.path.join(data_dir, "gsm8k.jsonl"), "--limit", "6",
            "--batch-size", "2", "--max-new-tokens", "8", "--out", out]
    shim = ("import errno, os, runpy, sys\ncalls, real = [0], os.fsync\n"
            "def fsync(fd):\n    calls[0] += os.readlink(f'/proc/self/fd/{fd}').endswith('samples.jsonl')\n"
            "    if calls[0] == 2:\n        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "    return real(fd)\n"
            f"os.fsync = fsync\nsys.argv = {args!r}\nrunpy.run_path('evaluate.py', run_name='__main__')\n")
    proc = run_cli("-c", shim)
    assert_one_line_error(proc, "error: no space left on the device", "rerun the same command to resume")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: 4 finished samples" in rerun.stdout, rerun.stdout  # batches 1 and 2 (written, then fsync)
    assert len(open(os.path.join(out, "samples.jsonl")).read().splitlines()) == 6


def test_cli_main_disk_full_from_safetensors_and_nan_sampling():
    """The two errors that are not OSErrors: safetensors wraps ENOSPC in its own error (seen on a real full
    tmpfs while saving a checkpoint); torch.multinomial refuses nan probabilities (a diverged model)."""
    from safetensors import SafetensorError
    import torch

    def work(kind):
        if kind == "safetensors":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")
        torch.multinomial(torch.tensor([[float("nan"), 1.0]]), 1)

    for kind, needle in (("safetensors", "no space left on the device"), ("nan", "non-finite probabilities")):
        with pytest.raises(SystemExit) as e:
            ev.cli_main(work, kind, resumes=False)
        assert str(e.value.code).startswith("error: ") and needle in str(e.value.code), e.value.code
    with pytest.raises(ValueError):  # anything else is a bug: its traceback stays
        ev.cli_main(lambda a: int("x"), None, resumes=False)


@pytest.mark.parametrize("script,flags", [
    ("em_ft.py", ["--loss-temperature", "1e-45"]),  # logits / 1e-45 overflow: the first loss is nan
    ("em_rl.py", ["--lr", "1e30", "--ppo-minibatches", "2"]),  # update 1 wrecks the weights: update 2's loss is nan
])
def test_non_finite_loss_stops_before_saving(script, flags, tiny_model_dir, data, tmp_path):
    out = tmp_path / "o"
    extra = ["--data", data, "--n-rollouts", "2", "--steps", "1"] if script == "em_rl.py" else ["--max-steps", "1"]
    proc = run_cli(script, "--model", tiny_model_dir, "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out),
                   *extra, *flags)
    assert_one_line_error(proc, "step 1: loss nan", "not finite", "stopped without saving")
    assert proc.returncode == 1 and not [d for d in os.listdir(out) if d.startswith("step_")], os.listdir(out)


def test_check_finite():
    training.check_finite(3, loss=1.5, grad_norm=0.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ev.EvalError, match=r"step 3: grad_norm (nan|inf|-inf) \(not finite\)"):
            training.check_finite(3, loss=1.5, grad_norm=bad)


def test_number_types():
    import argparse
    ok = [(ev.pos_int, "3", 3), (ev.nonneg_int, "0", 0), (ev.pos_float, "1e-45", 1e-45), (ev.unit_float, "1", 1.0),
          (ev.unit_open, "0", 0.0), (ev.finite_float, "-2.5", -2.5), (ev.seed_int, str(2 ** 32 - 1), 2 ** 32 - 1),
          (ev.number(int, 2), "2", 2), (training.step_list, "3, 1,3", [1, 3]), (training.step_list, "", [])]
    for parse, text, want in ok:
        assert parse(text) == want and type(parse(text)) is type(want), (text, want)
    bad = [(ev.pos_int, "0"), (ev.pos_int, "1.0"), (ev.pos_int, ""), (ev.nonneg_int, "-1"), (ev.pos_float, "0"),
           (ev.pos_float, "nan"), (ev.pos_float, "inf"), (ev.pos_float, "1e400"), (ev.pos_float, "1e300"),
           (ev.nonneg_float, "-0.1"),
           (ev.unit_float, "0"), (ev.unit_float, "1.0001"), (ev.unit_open, "1"), (ev.finite_float, "-inf"),
           (ev.seed_int, str(2 ** 32)), (ev.number(int, 2), "1"), (training.step_list, "0"), (training.step_list, "1,,x")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)


def test_load_model_names_what_is_wrong(tiny_model_dir, tmp_path):
    trunc, notok = tmp_path / "trunc", tmp_path / "notok"
    shutil.copytree(tiny_model_dir, trunc)
    weights = trunc / "model.safetensors"
    with open(weights, "r+b") as f:  # a download cut short
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ev.EvalError, match="model.safetensors is truncated or corrupt"):
        ev.load_model(str(trunc))
    notok.mkdir()  # weights and config, no tokenizer: the folder a bare state-dict save leaves
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model_dir, f), notok / f)
    with pytest.raises(ev.EvalError, match="has weights but no tokenizer files"):
        ev.load_model(str(notok))


def test_rerun_into_the_same_out_starts_a_fresh_log(tiny_model_dir, data, tmp_path, capsys):
    """A second run into --out: log.jsonl holds only its own steps (each once) and the checkpoints it wrote;
    the first run's log is kept as log.prev.jsonl."""
    import em_ft
    import em_rl
    for script, main, common in (
            ("em_ft", em_ft.main, ["--batch-size", "2", "--max-new-tokens", "4", "--lr", "1e-3", "--max-steps"]),
            ("em_rl", em_rl.main, ["--data", data, "--batch-size", "1", "--n-rollouts", "2", "--max-new-tokens", "4",
                                   "--kl-coef", "0", "--ppo-minibatches", "1", "--steps"])):
        out = str(tmp_path / script)
        main(["--model", tiny_model_dir, "--out", out, "--save-steps", "1", *common, "2"])
        capsys.readouterr()
        main(["--model", tiny_model_dir, "--out", out, *common, "1"])
        assert "holds checkpoints of an earlier run (step_1, step_2)" in capsys.readouterr().out, script
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        prev = [json.loads(line) for line in open(os.path.join(out, "log.prev.jsonl"))]
        steps = [r["step"] for r in log if "loss" in r]
        assert steps == [1] and [r["checkpoint"] for r in log if "checkpoint" in r] == ["step_1"], (script, log)
        assert [r["step"] for r in prev if "loss" in r] == [1, 2], (script, prev)
        assert [r["checkpoint"] for r in prev if "checkpoint" in r] == ["step_1", "step_2"], (script, prev)


def _drive_main(spec):
    """Subprocess side of drive(): import each CLI once, call main(argv) per case, report exit code + stderr."""
    import importlib
    results = []
    for script, argv, raise_in_work in json.load(open(spec)):
        mod = importlib.import_module(script[:-3])
        sys.argv[0] = script  # argparse's prog name, as the user would see it
        if raise_in_work:  # patched where main's work calls it (by name or via the evaluate module)
            def boom(*a, **k):
                raise KeyboardInterrupt if raise_in_work == "KeyboardInterrupt" else \
                    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            saved = (ev.load_benchmark, getattr(mod, "load_benchmark", None))
            ev.load_benchmark = boom
            if saved[1] is not None:
                mod.load_benchmark = boom
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                mod.main(argv)
                code = 0
            except SystemExit as e:  # sys.exit("error: ...") prints its message and exits 1
                code = 1 if isinstance(e.code, str) else (e.code or 0)
                err.write(e.code + "\n" if isinstance(e.code, str) else "")
            except BaseException:
                code = "traceback"
                err.write(traceback.format_exc())
        if raise_in_work:
            ev.load_benchmark = saved[0]
            if saved[1] is not None:
                mod.load_benchmark = saved[1]
        results.append({"code": code, "stderr": err.getvalue()})
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _drive_main(sys.argv[1])


def test_gpu_hidden_in_process_and_in_scripts():
    """The suite is CPU-only by design (conftest hides the GPU before torch loads): in this process and in every
    script a test starts, which inherits the environment."""
    import torch
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    proc = run_cli("-c", "import os, torch; print(os.environ['CUDA_VISIBLE_DEVICES'] == '', torch.cuda.is_available())")
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "False"], proc.stdout + proc.stderr


def test_dependency_floors_match_requirements_and_an_older_install_is_one_line():
    """evaluate.FLOORS is requirements.txt's floors and requirements-min.txt's pins; an installed version below a
    floor stops every script with one line naming the package, the versions and the pip command."""
    import evaluate as ev
    reqs = open(os.path.join(ROOT, "requirements.txt")).read()
    assert dict(re.findall(r"^([\w-]+)>=([\d.]+)$", reqs, flags=re.M)) == ev.FLOORS
    pins = dict(re.findall(r"^([\w-]+)==([\d.]+)$", open(os.path.join(ROOT, "requirements-min.txt")).read(),
                           flags=re.M))
    assert ev.FLOORS == {k: ".".join(v.split(".")[:len(ev.FLOORS[k].split("."))]) for k, v in pins.items()}
    old = ("import importlib.metadata as m; real = m.version; "
           "m.version = lambda n: '4.57.6' if n == 'transformers' else real(n); import runpy; "
           "runpy.run_path('em_ft.py', run_name='__main__')")
    proc = run_cli("-c", old, "--model", "x")
    assert_one_line_error(proc, "transformers 4.57.6 is installed", "transformers>=5.0", "pip install")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

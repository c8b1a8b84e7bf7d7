"""Hostile candidates stay contained: the run fails with a reason, the machine is unharmed."""

import os
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

from evals import code_grader, sandbox
from evals.code_grader import CodeGrader
from evals.sandbox import REPO_ROOT, SANDBOX_UID_BASE, UID_SLOTS, Limits, isolation, run_program

SHORT = Limits(wall_s=2.0, cpu_s=2, memory_mb=512)
ISOLATED = isolation().mode != "none"
needs_namespaces = pytest.mark.skipif(
    not ISOLATED, reason=f"namespaces not permitted here, nothing to contain with: {isolation().detail}"
)


def _sandboxed_pids() -> list[int]:
    """This process's sandboxes still running: descendants of our fork server, and processes of a
    sandbox uid that no other process's fork server started."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone
        uid = int(status.split("\nUid:")[1].split()[0])
        ppid = int(status.split("\nPPid:")[1].split()[0])
        procs[int(entry.name)] = (ppid, uid, cmdline)
    ours = sandbox._server.proc.pid if sandbox._server else None
    servers = {pid for pid, (ppid, _, cmdline) in procs.items()  # the top of each grader's sandbox tree
               if b"fork_server.py" in cmdline and b"fork_server.py" not in procs.get(ppid, (0, 0, b""))[2]}

    def tree(pid: int) -> int | None:
        while pid in procs and pid not in servers:
            pid = procs[pid][0]
        return pid if pid in servers else None

    return [pid for pid, (_, uid, _) in procs.items() if pid != ours and (
        (ours is not None and tree(pid) == ours)
        or (SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + UID_SLOTS and tree(pid) in (None, ours)))]


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    # Another test worker's sandbox can be seen between its parent's death and its own for a moment:
    # a leftover is a process still there seconds later.
    deadline = time.monotonic() + 3
    while (left := _sandboxed_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "a sandboxed process outlived its run"


def test_infinite_loop_hits_the_wall_clock():
    start = time.monotonic()
    res = run_program("while True:\n    pass\n", limits=Limits(wall_s=1.0))
    assert (res.status, res.returncode) == ("timeout", -9)
    assert time.monotonic() - start < 3


def test_cpu_limit():
    res = run_program("while True:\n    pass\n", limits=Limits(wall_s=10.0, cpu_s=1))
    assert res.status == "timeout" and res.reason == "cpu limit 1s"


def test_sleeping_background_children_are_killed():
    prog = (
        "import os, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "if os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(60)\n"
        "print('parent done')\n"
    )
    if not ISOLATED:  # a setsid() child leaves the process group; only a pid namespace catches it
        prog = prog.replace("os.setsid()", "pass")
    res = run_program(prog, limits=SHORT)
    assert res.status == "ok" and res.stdout == "parent done\n"


@pytest.mark.skipif(
    not ISOLATED and os.geteuid() == 0,
    reason="as root without namespaces RLIMIT_NPROC does not apply: a fork bomb would hurt the machine",
)
def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    res = run_program(bomb, limits=SHORT)
    assert res.status == "timeout"
    assert time.monotonic() - start < 6


def test_memory_bomb():
    for bomb in ("x = bytearray(8 << 30)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"):
        res = run_program(bomb, limits=Limits(wall_s=10.0, cpu_s=10, memory_mb=512))  # page faults take time
        assert res.status == "memory", res


def test_huge_output_is_cut_off():
    for stream in ("stdout", "stderr"):
        start = time.monotonic()
        res = run_program(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n", limits=SHORT)
        assert res.status == "output_limit"
        assert len(getattr(res, stream)) <= SHORT.output_bytes
        assert time.monotonic() - start < 2


def test_big_file_hits_the_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (64 << 20))", limits=Limits(file_size_mb=1))
    assert res.status in ("failed", "output_limit") and "File too large" in res.stderr + res.reason


@needs_namespaces
def test_writes_outside_the_cwd_do_not_land():
    token = uuid.uuid4().hex
    targets = [
        Path("/tmp") / f"r1-escape-{token}",
        REPO_ROOT / f"r1-escape-{token}",
        Path("/dev/shm") / token,
    ]
    prog = "for path in %r:\n    try:\n        open(path, 'w').write('x')\n    except OSError as e:\n        print(path, e)\nopen('inside', 'w').write('fine')\n"
    res = run_program(prog % [str(t) for t in targets], limits=SHORT)
    assert res.status == "ok", res
    assert [t for t in targets if t.exists()] == []


@needs_namespaces
def test_filling_the_disk_stops_at_the_tmpfs():
    prog = "i = 0\ntry:\n    while True:\n        open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n        i += 1\nexcept OSError as e:\n    print(i, e.errno)\n"
    res = run_program(prog, limits=SHORT)
    written, errno = map(int, res.stdout.split())
    assert res.status == "ok" and errno == 28 and written <= 64  # ENOSPC: 64 MiB for everything


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("R1_FAKE_API_KEY", "sk-test-0123456789")
    prog = "import os\nprint(sorted(os.environ))\nprint('sk-test' in repr(os.environ))\n"
    if ISOLATED:  # the parent's /proc entry is out of reach too (no pid namespace: same uid can read it)
        prog += f"try:\n    print('sk-test' in open('/proc/{os.getpid()}/environ').read())\nexcept OSError:\n    print(False)\n"
    res = run_program(prog, limits=SHORT)
    assert res.status == "ok"
    lines = res.stdout.splitlines()
    assert "R1_FAKE_API_KEY" not in lines[0] and set(lines[1:]) == {"False"}


def test_loopback_socket_fails_when_isolated():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        port = server.getsockname()[1]
        prog = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        )
        res = run_program(prog, limits=SHORT)
    finally:
        server.close()
    assert res.network_isolated == isolation().network_isolated
    if isolation().network_isolated:
        assert res.status == "failed" and "Network is unreachable" in res.reason
    else:
        assert res.stdout == "connected\n", "no isolation: the probe must say so, and it did"


@needs_namespaces
def test_kill_everything_only_kills_the_sandbox():
    prog = (
        "import os, signal, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "os.kill(-1, signal.SIGKILL)  # everything this uid may signal, except itself\n"
        "print('child got', child.wait())\n"
    )
    res = run_program(prog, limits=SHORT)
    assert res.status == "ok" and res.stdout == "child got -9\n"  # and this test process lives on


def test_grader_survives_hostile_candidates():
    grader = CodeGrader(workers=2, limits=SHORT)
    tests = {"kind": "functional", "entry_point": "f", "test": "def check(f):\n    assert f() == 1\n"}
    hostile = [
        "def f():\n    while True:\n        pass\n",
        "def f():\n    return bytearray(8 << 30)\n",
        "def f():\n    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n",
        "def f():\n    import os\n    os._exit(0)\n",  # exit 0 before the asserts: no free pass
        "def f():\n    raise SystemExit(0)\n",
        "import sys\nsys.setrecursionlimit(10**6)\ndef f():\n    return f()\n",
    ]
    verdicts = grader.grade(
        [(tests, code, "") for code in hostile] + [(tests, "def f():\n    return 1\n", "")]
    )
    assert [v.category for v in verdicts[:5]] == ["timeout", "wrong", "timeout", "wrong", "wrong"]
    assert verdicts[5].category in ("wrong", "timeout") and verdicts[6].correct  # a million frames: speed decides
    assert verdicts[1].detail.startswith("MemoryError")


# ----------------------------------------------------------------------------- the filesystem, uids, layers


@needs_namespaces
def test_the_candidate_sees_an_empty_filesystem():
    prog = (
        "import os\n"
        "print(sorted(os.listdir('/')))\n"
        "for path in %r:\n"
        "    print(os.path.exists(path))\n"
        "for d in ('/', '/usr', '/usr/lib', '/jail', '/dev', '/root'):\n"
        "    try:\n"
        "        open(os.path.join(d, 'x'), 'w')\n"
        "        print('wrote', d)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    paths = [str(REPO_ROOT), str(REPO_ROOT.parent / "shared" / "benchmarks"), "/proc/1", "/etc/passwd",
             "/run", "/var/lock", "/home", "/work", sysconfig.get_path("purelib") + "/pytest"]
    res = run_program(prog % paths, limits=SHORT)
    lines = res.stdout.splitlines()
    assert res.status == "ok", res
    assert set(eval(lines[0])) <= {"tmp", "usr", "lib", "lib64", "jail", "dev", "root"}
    assert lines[1:] == ["False"] * len(paths)  # and nothing outside /tmp was writable


@needs_namespaces
def test_lock_and_shared_directories_keep_nothing():
    token = uuid.uuid4().hex
    targets = [Path(d) / f"r1-escape-{token}" for d in ("/run/lock", "/var/lock", "/var/tmp", "/dev/shm", "/tmp")]
    prog = "for path in %r:\n    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
    assert run_program(prog % [str(t) for t in targets], limits=SHORT).status == "ok"
    assert [t for t in targets if t.exists()] == []


@pytest.mark.skipif("slot_uid" not in isolation().layers, reason="per-slot uids need root")
def test_each_slot_has_its_own_uid_across_grader_processes(tmp_path):
    # Another grader process holds slot 0 (flock on its lock file): this process must not take its uid.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(sandbox._slot_dir() / '0.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)\n"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        uids = {run_program("import os\nprint(os.getuid())", limits=SHORT).stdout.strip() for _ in range(2)}
    finally:
        holder.kill()
        holder.wait()
    assert str(SANDBOX_UID_BASE) not in uids and all(int(u) > SANDBOX_UID_BASE for u in uids)


@pytest.mark.skipif("seccomp" not in isolation().layers, reason=f"no seccomp here: {isolation().detail}")
def test_ptrace_and_reading_another_process_are_refused():
    prog = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(5)\n    os._exit(0)\n"
        "print(libc.ptrace(16, child, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH\n"
        "buf = ctypes.create_string_buffer(8)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER: new capabilities\n"
    )
    res = run_program(prog, limits=SHORT)
    assert res.stdout.split() == ["-1", "1", "-1", "1"]  # EPERM, EPERM


def test_the_layers_in_force_are_named(monkeypatch):
    described = isolation().describe()
    assert described.startswith("sandbox layers: ")
    assert all(layer in described for layer in isolation().layers)
    monkeypatch.setenv("R1_SANDBOX_ISOLATION", "none")
    forced = sandbox._probe_isolation()
    assert forced.layers == () and forced.describe() == (
        "sandbox layers: none (not active: namespaces, empty_root, slot_uid, no_new_privs, seccomp; "
        "forced by R1_SANDBOX_ISOLATION=none)"
    )


# ----------------------------------------------------------------------------- reward hacks: all graded wrong

ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """a + b"""\n'
FUNCTIONAL = {"kind": "functional", "entry_point": "add", "prompt": ADD_PROMPT,
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
MBPP_STYLE = {"kind": "functional", "test": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"}
EVALPLUS = {"kind": "evalplus", "task_id": "HumanEval/9002", "entry_point": "add", "prompt": ADD_PROMPT,
            "canonical_solution": "    return a + b\n", "base_input": [[2, 3], [-1, 1]], "plus_input": [[7, 8]],
            "atol": 0}
STDIO = {"kind": "stdio", "cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}],
         "time_limit_s": 2}
HONEST = "def add(a, b):\n    return a + b\n"

ALWAYS_EQUAL = "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
FORGE_ALL_FDS = (
    "import os\n"
    "def _forge():\n"
    "    lines = [b'{\"passed\": true}\\n', b'{\"loaded\": true}\\n', b'{\"t\": 0}\\t5\\n', b'{\"rc\": 0}\\n', b'ok\\n']\n"
    "    for fd in range(64):\n"
    "        for line in lines:\n"
    "            try:\n"
    "                os.write(fd, line)\n"
    "            except OSError:\n"
    "                pass\n"
)
FIND_SEND = (  # the in-sandbox program's reporting function, found by walking the heap, called directly
    "import gc\n"
    "def _send_forgeries():\n"
    "    for o in gc.get_objects():\n"
    "        if callable(o) and getattr(o, '__name__', '') in ('send', '_send', 'emit'):\n"
    "            for msg in ({'passed': True}, {'loaded': True}, {'t': 0}):\n"
    "                try:\n"
    "                    o(msg)\n"
    "                except BaseException:\n"
    "                    pass\n"
)
FUNCTION_HACKS = {
    "always-equal object": ALWAYS_EQUAL + "def add(a, b):\n    return Any()\n",
    "always-equal int subclass": "class Z(int):\n    def __eq__(self, o):\n        return True\n"
                                 "    __hash__ = int.__hash__\ndef add(a, b):\n    return Z(7)\n",
    "forged __class__": ALWAYS_EQUAL.replace("class Any:\n", "class Any:\n    __class__ = property(lambda s: int)\n")
                        + "def add(a, b):\n    return Any()\n",
    "always-equal str and list": "class S(str):\n    __eq__ = lambda s, o: True\n    __hash__ = str.__hash__\n"
                                 "def add(a, b):\n    return S('no')\n",
    "forged lines on every fd, then exit 0": FORGE_ALL_FDS + "def add(a, b):\n    _forge()\n    os._exit(0)\n",
    "forged lines from an atexit hook": FORGE_ALL_FDS + "import atexit\natexit.register(_forge)\n"
                                        "def add(a, b):\n    raise SystemExit(0)\n",
    "the reporting function called from the heap": FIND_SEND + "def add(a, b):\n    _send_forgeries()\n"
                                                   "    return 0\n",
    "junk on the result pipe": "import os\ndef add(a, b):\n    for fd in range(64):\n        try:\n"
                               "            os.write(fd, b'\\x00garbage\\n' * 1000)\n        except OSError:\n"
                               "            pass\n    return 0\n",
    "monkeypatched checker in __main__": "import sys, builtins\nm = sys.modules['__main__']\n"
        "for name in dir(m):\n    if callable(getattr(m, name)):\n"
        "        setattr(m, name, lambda *a, **k: {'passed': True})\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"
        "def add(a, b):\n    return 0\n",
    "the parent killed": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                         "    return a + b\n",
    "every process of its uid killed": "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n",
    "the parent's memory read": "import os\ndef add(a, b):\n"
        "    for path in (f'/proc/{os.getppid()}/mem', '/proc/self/mem'):\n        try:\n"
        "            open(path, 'rb')\n        except OSError:\n            pass\n    return 0\n",
    "the expected values searched on disk": "import os\ndef add(a, b):\n    hits = []\n"
        "    for root, dirs, files in os.walk('/'):\n"
        "        hits += [os.path.join(root, f) for f in files if 'HumanEval' in f or f.endswith('.jsonl')]\n"
        "    return len(hits) + 12345\n",
    "exit 0 at import": "raise SystemExit(0)\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "an exception the tests might swallow": "def add(a, b):\n    raise AssertionError('pretend')\n",
}


@pytest.fixture(scope="module")
def grader():
    return CodeGrader(workers=2, limits=SHORT)


@pytest.mark.parametrize("tests", [FUNCTIONAL, MBPP_STYLE, EVALPLUS], ids=["functional", "mbpp", "evalplus"])
def test_function_reward_hacks_are_graded_wrong(grader, tests):
    names = list(FUNCTION_HACKS)
    verdicts = grader.grade([(tests, HONEST, ADD_PROMPT)] + [(tests, FUNCTION_HACKS[n], ADD_PROMPT) for n in names])
    assert verdicts[0].correct, verdicts[0]
    assert [n for n, v in zip(names, verdicts[1:], strict=True) if v.correct] == []
    assert all(v.category in ("wrong", "timeout") for v in verdicts[1:]), verdicts


STDIO_HACKS = {
    "the expected output snooped from memory and cwd": "import gc, os\nprint(len(gc.get_objects()), os.listdir('.'))\n",
    "forged lines on every fd": FORGE_ALL_FDS + "_forge()\n",
    "the reporting function called from the heap": FIND_SEND + "_send_forgeries()\nprint(0)\n",
    "the harness killed": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "exit 0, nothing printed": "raise SystemExit(0)\n",
    "a file planted for the next case": "open('case1.out', 'w').write('0\\n')\nprint(5)\n",
}


def test_stdio_reward_hacks_are_graded_wrong(grader):
    names = list(STDIO_HACKS)
    honest = "a, b = map(int, input().split())\nprint(a + b)\n"
    verdicts = grader.grade([(STDIO, honest, "")] + [(STDIO, STDIO_HACKS[n], "") for n in names])
    assert verdicts[0].correct
    assert [n for n, v in zip(names, verdicts[1:], strict=True) if v.correct] == []


def test_a_hostile_candidate_cannot_hold_a_slot(monkeypatch):
    # Uncached evalplus problem; the candidate ignores SIGALRM, then sleeps: the time limit comes from
    # outside (max(4 s, 4 x canonical) per input, shortened here), not from a signal it can ignore.
    monkeypatch.setattr(code_grader, "MIN_INPUT_TIME_S", 0.5)
    monkeypatch.setattr(code_grader, "LOAD_TIME_S", 3.0)
    stubborn = ("import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                "def add(a, b):\n    time.sleep(600)\n")
    asleep_at_load = "import time\ntime.sleep(600)\ndef add(a, b):\n    return a + b\n"
    start = time.monotonic()
    verdicts = CodeGrader(workers=2).grade([(EVALPLUS, stubborn, ""), (EVALPLUS, asleep_at_load, "")])
    assert time.monotonic() - start < 12  # the canonical run, then two candidates in parallel
    assert [(v.category, v.detail) for v in verdicts] == [
        ("wrong", "base input 0: time limit 0.5s"), ("wrong", "loading the program: time limit 3.0s")]


SNOOP = (  # every string this process can reach: the heap, every frame's locals, stdin, the cwd, /jail
    "import gc, os, sys\n"
    "def _snoop():\n"
    "    seen = [repr(o) for o in gc.get_objects()]\n"
    "    f = sys._getframe()\n"
    "    while f:\n"
    "        seen.append(repr(f.f_locals))\n"
    "        f = f.f_back\n"
    "    for d in ('.', '/jail', '/tmp'):\n"
    "        for name in os.listdir(d):\n"
    "            try:\n"
    "                seen.append(open(os.path.join(d, name), errors='replace').read())\n"
    "            except OSError:\n"
    "                pass\n"
    "    text = ' '.join(seen)\n"
    "    i = text.find('SECRET-')\n"
    "    return text[i:i + 11] if i >= 0 else 'nothing'\n"
    "def shout(s):\n"
    "    return _snoop()\n"
)


@pytest.mark.parametrize("kind", ["functional", "evalplus"])
def test_expected_values_are_out_of_the_candidates_reach(grader, kind):
    if kind == "functional":
        tests = {"kind": "functional", "entry_point": "shout",
                 "test": "def check(candidate):\n    assert candidate('x') == 'SECRET-4f2a'\n"}
    else:
        tests = {"kind": "evalplus", "task_id": "HumanEval/9003", "entry_point": "shout", "prompt": "",
                 "canonical_solution": "def shout(s):\n    return 'SECRET-' + '4f2a'\n", "base_input": [["x"]],
                 "plus_input": [], "atol": 0}
    honest = "def shout(s):\n    return 'SECRET-4f2a'\n"
    snooper, right = grader.grade([(tests, SNOOP, ""), (tests, honest, "")])
    assert right.correct and (snooper.category, snooper.passed) == ("wrong", 0), snooper


def test_a_dead_fork_server_is_replaced():
    assert run_program("pass", limits=SHORT).status == "ok"
    dead = sandbox._server.proc
    dead.kill()
    dead.wait()
    res = run_program("print('again')", limits=SHORT)  # at once: the reader may not have seen EOF yet
    assert (res.status, res.stdout) == ("ok", "again\n") and sandbox._server.proc.pid != dead.pid

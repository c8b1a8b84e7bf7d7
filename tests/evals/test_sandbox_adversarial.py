"""Hostile candidates stay contained: the run fails with a reason, the machine is unharmed."""

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from evals.code_grader import CodeGrader
from evals.sandbox import REPO_ROOT, Limits, isolation, run_program

SHORT = Limits(wall_s=2.0, cpu_s=2, memory_mb=512)
ISOLATED = isolation().mode != "none"
needs_namespaces = pytest.mark.skipif(
    not ISOLATED, reason=f"namespaces not permitted here, nothing to contain with: {isolation().detail}"
)


def _sandboxed_pids() -> list[int]:
    """Processes still running in a sandbox directory (every sandboxed process starts in one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and "r1-sandbox-" in os.readlink(entry / "cwd"):
                pids.append(int(entry.name))
        except OSError:
            pass  # gone, or not ours to read
    return pids


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    time.sleep(0.05)
    assert _sandboxed_pids() == [], "a sandboxed process outlived its run"


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
        res = run_program(bomb, limits=SHORT)
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
    reasons = [v.reason.split(":")[0] for v in verdicts]
    assert [v.correct for v in verdicts[:-1]] == [False] * len(hostile)
    assert reasons[:5] == ["timeout", "memory", "output_limit", "failed", "failed"]
    assert verdicts[-1].correct

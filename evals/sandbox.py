"""Run untrusted Python (model-written code) in a locked-down subprocess.

    from evals.sandbox import Limits, run_program
    res = run_program("print(input()[::-1])", stdin="abc", limits=Limits(wall_s=5))
    res.status, res.stdout          # ("ok", "cba\\n")

Every run gets, whatever this machine allows:
- a real subprocess `python -I -S prog.py` (no site-packages, no PYTHON* variables) in its own
  session and process group, SIGKILLed as a group at the wall-clock deadline and after it exits;
- a fresh temporary directory as cwd, deleted afterwards, and a scrubbed environment (PATH, LANG,
  LC_ALL, HOME, TMPDIR only: the parent's variables, API keys included, are not passed on);
- rlimits via prlimit(1): CPU seconds, address space, file size, processes, open files, no core;
- stdout and stderr read to at most `Limits.output_bytes` each (a flood is cut off and killed).

When namespaces are permitted (probed once, `isolation()`), it also runs under `unshare --net --pid
--mount`, with fresh tmpfs mounts over /tmp, /var/tmp and /dev/shm and its cwd copied into the new
/tmp: no network at all (not even loopback), it sees only its own processes, everything it started
dies with it, and everything it writes vanishes with it (64 MiB in all). Started as root, the program
runs under a uid of its own (60000 + a slot per concurrent run): it cannot write root-owned files,
raise its limits or signal anything outside, and RLIMIT_NPROC counts only its processes. That uid
must be able to run the interpreter, so the probe tries ours, then python3.X / python3 on PATH, and
`isolation().interpreter` names the one in use (here /usr/bin/python3.11 when ours lives in /root).
Started as another user, it runs as that user mapped to root in a user namespace, with the same
network, process and /tmp isolation and the repository hidden; it can write what the user can.

When namespaces are not permitted (`isolation().mode == "none"`), only the first list applies: the
program can use the network, write wherever the current user can, and a child that calls setsid()
can outlive the run. `RunResult.network_isolated` records which case a result came from. Set
R1_SANDBOX_ISOLATION=none to force that mode.
"""

from __future__ import annotations

import functools
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SANDBOX_UID_BASE = 60000  # per-run uids 60000..60999 when started as root
_UID_SLOTS = 1000
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Runs as PID 1 of the new namespaces, as root there: hide the writable and shared directories
# behind fresh tmpfs mounts, move the staged cwd into the new /tmp (so everything the program writes
# counts against one 64 MiB tmpfs, not the disk), then run the program as a child rather than exec
# it, so that it keeps normal signal semantics (PID 1 ignores default-action signals); sh exits with
# 128+N for a child killed by signal N.
_NS_SCRIPT = """
IFS=:
for d in $SBX_TMP; do mount -t tmpfs -o size=64m,mode=1777 sandbox "$d" || exit 125; done
for d in $SBX_HIDE; do mount -t tmpfs -o ro,size=1m sandbox "$d" || exit 125; done
unset SBX_TMP SBX_HIDE IFS
cp -a . /tmp/r1-sandbox-cwd && cd /tmp/r1-sandbox-cwd || exit 125
"$@"
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run; the rlimits apply to each of its processes."""

    wall_s: float = 10.0  # wall clock, then SIGKILL to the whole group
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU at the limit, SIGKILL one second later)
    memory_mb: int = 2048  # RLIMIT_AS (address space; Python raises MemoryError)
    file_size_mb: int = 16  # RLIMIT_FSIZE (largest file the program may write)
    nproc: int = 64  # RLIMIT_NPROC (processes + threads of the sandbox uid)
    nofile: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # cap on stdout and on stderr, each

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "file_size_mb", "nproc", "nofile", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    status: str  # "ok" | "failed" | "timeout" | "memory" | "output_limit" | "killed" | "error"
    returncode: int | None  # exit code, or -N when killed by signal N
    stdout: str
    stderr: str
    wall_s: float
    reason: str  # "ok", "exit code 1: ValueError: ...", "wall-clock limit 2.0s", ...
    network_isolated: bool


@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces+uid" | "namespaces" | "none"
    network_isolated: bool
    interpreter: str  # the Python that runs the programs
    detail: str  # what the probe saw (and the interpreter's version)


# ----------------------------------------------------------------------------- public API


def run_program(
    source: str,
    stdin: str | bytes | None = None,
    limits: Limits = Limits(),
    files: dict[str, str | bytes] | None = None,
) -> RunResult:
    """Run `source` as a Python program in the sandbox; `files` are written into its cwd first."""
    iso = isolation()
    start = time.monotonic()
    with _uid_slot(iso.mode == "namespaces+uid") as uid:
        out, err, why_stopped, rc = _run(iso, uid, source, stdin, limits, files or {})
    wrapped = iso.mode != "none"
    status, reason = _classify(rc, err, why_stopped, limits, wrapped)
    return RunResult(
        status=status,
        returncode=None if rc is None else _returncode(rc, wrapped),
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        wall_s=time.monotonic() - start,
        reason=reason,
        network_isolated=iso.network_isolated,
    )


@functools.cache
def isolation() -> Isolation:
    """Probe once which isolation this machine permits, strongest first."""
    base = _base_interpreter()
    forced = os.environ.get("R1_SANDBOX_ISOLATION", "")
    if forced == "none":
        return Isolation("none", False, base, "forced by R1_SANDBOX_ISOLATION=none")
    if forced:
        raise ValueError(f"R1_SANDBOX_ISOLATION={forced!r}: only 'none' (or unset) is understood")
    # Real root must drop to a uid: root inside a mount namespace can still write the real disk.
    mode = "namespaces+uid" if os.geteuid() == 0 else "namespaces"
    missing = [t for t in ("unshare", "prlimit", "setpriv") if not _has(t)]
    if missing:
        return Isolation("none", False, base, f"{', '.join(missing)} (util-linux) not found")
    problems = []
    for python in _interpreter_candidates():
        ok, detail = _probe(Isolation(mode, True, python, "probe"))
        if ok:
            return Isolation(mode, True, python, detail)
        problems.append(f"{python}: {detail}")
    return Isolation("none", False, base, f"{mode} failed: " + "; ".join(problems))


# ----------------------------------------------------------------------------- one run


def _run(iso: Isolation, uid, source, stdin, limits: Limits, files) -> tuple[bytes, bytes, str, int | None]:
    with tempfile.TemporaryDirectory(prefix="r1-sandbox-", ignore_cleanup_errors=True) as workdir:
        try:
            _stage(Path(workdir), source, files, uid)
            proc, stdin_file = _launch(_command(iso, uid, limits), workdir, stdin, limits, iso)
        except OSError as e:
            return b"", f"sandbox failed to start: {e}".encode(), "error", None
        with stdin_file:
            out, err, why_stopped = _collect(proc, time.monotonic() + limits.wall_s, limits.output_bytes)
    return out, err, why_stopped, proc.returncode


def _stage(workdir: Path, source: str, files: dict[str, str | bytes], uid: int | None) -> None:
    for name, content in {"prog.py": source, **files}.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"sandbox file name {name!r} must be a plain name inside the cwd")
        data = content.encode() if isinstance(content, str) else content
        (workdir / name).write_bytes(data)
        if uid is not None:
            os.chown(workdir / name, uid, uid)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _command(iso: Isolation, uid: int | None, limits: Limits) -> list[str]:
    python = [*_prlimit(limits), iso.interpreter, "-I", "-S", "prog.py"]
    if iso.mode == "none":
        return python
    argv = [_tool("unshare")]
    if os.geteuid() != 0:
        argv += ["--user", "--map-root-user"]
    argv += [
        "--net",
        "--pid",
        "--mount",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--propagation",
        "private",
    ]
    argv += ["/bin/sh", "-c", _NS_SCRIPT, "sandbox"]
    if uid is not None:
        argv += [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return argv + python


def _prlimit(limits: Limits) -> list[str]:
    # prlimit(1), not preexec_fn: preexec_fn forces a full fork() of this (maybe large, threaded)
    # process and can deadlock with threads; without it subprocess uses vfork.
    if not _has("prlimit"):
        return []  # _launch falls back to preexec_fn
    mb = 1 << 20
    return [
        _tool("prlimit"),
        f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
        f"--as={limits.memory_mb * mb}",
        f"--fsize={limits.file_size_mb * mb}",
        f"--nproc={limits.nproc}",
        f"--nofile={limits.nofile}",
        "--core=0",
        "--",
    ]


def _set_limits(limits: Limits):
    def apply():  # only without prlimit(1); runs in the child between fork and exec
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb, limits.file_size_mb * mb))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc, limits.nproc))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _env(iso: Isolation) -> dict[str, str]:
    env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
    if iso.mode != "none":  # read (and unset) by _NS_SCRIPT
        env["SBX_TMP"] = ":".join(d for d in _PRIVATE_DIRS if os.path.isdir(d))
        # Without a uid of its own the program could write to the repository: hide it (read-only).
        # (Each mount costs ~5 ms, so not when the uid already keeps it out.)
        hidden = iso.mode == "namespaces" and not iso.interpreter.startswith(str(REPO_ROOT) + os.sep)
        env["SBX_HIDE"] = str(REPO_ROOT) if hidden else ""
    return env


def _launch(argv, workdir, stdin, limits: Limits, iso: Isolation):
    # stdin comes from an unlinked temp file: no pipe to feed, nothing left on disk.
    stdin_file = tempfile.TemporaryFile()
    if stdin is not None:
        stdin_file.write(stdin.encode() if isinstance(stdin, str) else stdin)
        stdin_file.seek(0)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=_env(iso),
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=None if _has("prlimit") else _set_limits(limits),
        )
    except BaseException:
        stdin_file.close()
        raise
    return proc, stdin_file


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Read both pipes to EOF, the deadline or the cap; always leaves the group dead and reaped."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    why_stopped = ""
    with selectors.DefaultSelector() as sel:
        for pipe in bufs:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map() and not why_stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why_stopped = "timeout"
                break
            events = sel.select(min(remaining, 0.1))
            if not events and proc.poll() is not None:
                _kill_group(proc)  # exited, but a leftover child holds the pipes: EOF comes next
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                buf += chunk[: cap - len(buf)]
                if len(buf) >= cap:
                    why_stopped = "output_limit"
    _kill_group(proc)
    for pipe in bufs:
        pipe.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), why_stopped


def _kill_group(proc: subprocess.Popen) -> None:
    # Also after a clean exit: background children of the program must not linger.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ----------------------------------------------------------------------------- verdicts


def _signal_of(rc: int, wrapped: bool) -> int | None:
    if rc < 0:
        return -rc
    if wrapped and rc > 128:  # sh reports a child killed by signal N as 128+N
        return rc - 128
    return None


def _returncode(rc: int, wrapped: bool) -> int:
    sig = _signal_of(rc, wrapped)
    return -sig if sig else rc


def _classify(rc, err: bytes, why_stopped: str, limits: Limits, wrapped: bool) -> tuple[str, str]:
    if why_stopped == "error":
        return "error", err.decode()
    if why_stopped == "timeout":
        return "timeout", f"wall-clock limit {limits.wall_s}s"
    if why_stopped == "output_limit":
        return "output_limit", f"output over {limits.output_bytes} bytes"
    if wrapped and rc == 125:
        return "error", f"sandbox setup failed: {_last_line(err)}"
    sig = _signal_of(rc, wrapped)
    if sig == signal.SIGXCPU:
        return "timeout", f"cpu limit {limits.cpu_s}s"
    if sig == signal.SIGXFSZ:
        return "output_limit", f"file size limit {limits.file_size_mb} MiB"
    if rc != 0 and b"MemoryError" in err:
        return "memory", f"memory limit {limits.memory_mb} MiB: {_last_line(err)}"
    if sig is not None:
        return "killed", f"killed by {signal.Signals(sig).name}"
    if rc != 0:
        return "failed", f"exit code {rc}: {_last_line(err)}"
    return "ok", "ok"


def _last_line(err: bytes) -> str:
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "(no stderr)"


# ----------------------------------------------------------------------------- probing, uids


@functools.cache
def _tool(name: str) -> str:
    return shutil.which(name, path=_SAFE_PATH) or name


def _has(name: str) -> bool:
    return os.path.isabs(_tool(name))


def _base_interpreter() -> str:
    # -S drops site-packages anyway, so the base interpreter behaves as the venv's would.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _interpreter_candidates() -> list[str]:
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    found = [
        _base_interpreter(),
        shutil.which(version, path=_SAFE_PATH),
        shutil.which("python3", path=_SAFE_PATH),
    ]
    return list(dict.fromkeys(os.path.realpath(p) for p in found if p))


def _probe(iso: Isolation) -> tuple[bool, str]:
    """Run a tiny program the way run_program would; it must start and find no network."""
    probe = (
        "import socket, sys\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n"
        "except OSError:\n    print(sys.version.split()[0])\n"
    )
    uid = SANDBOX_UID_BASE + _UID_SLOTS - 1 if iso.mode == "namespaces+uid" else None
    out, err, why, rc = _run(iso, uid, probe, None, Limits(), {})
    if rc != 0 or not out.strip():
        return False, f"exit {rc} {why}: {_last_line(err)}"
    return True, f"unshare works ({iso.mode}); Python {out.decode().strip()}"


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


class _uid_slot:
    """A uid no other live run uses, so RLIMIT_NPROC and kill(-1) stay within one run."""

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self.uid = None

    def __enter__(self) -> int | None:
        if not self.wanted:
            return None
        with _uid_lock:
            free = next((u for u in range(_UID_SLOTS - 1) if u not in _uids_in_use), None)
            if free is None:
                raise RuntimeError(f"more than {_UID_SLOTS - 1} concurrent sandbox runs")
            _uids_in_use.add(free)
        self.uid = SANDBOX_UID_BASE + free
        return self.uid

    def __exit__(self, *exc):
        if self.uid is not None:
            with _uid_lock:
                _uids_in_use.discard(self.uid - SANDBOX_UID_BASE)

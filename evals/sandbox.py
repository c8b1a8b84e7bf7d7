"""Run untrusted Python (model-written code) in a locked-down subprocess.

    from evals.sandbox import Limits, run_program, run_jail
    res = run_program("print(input()[::-1])", stdin="abc", limits=Limits(wall_s=5))
    res.status, res.stdout          # ("ok", "cba\\n")
    res = run_jail("evalplus_run.py", stdin=payload, limits=..., watch=watch)   # a program of evals/jail/

Every run is evals/sandbox_init.py, forked by evals/fork_server.py (a `python -I -S` started once per
grader process: no site-packages, no PYTHON* variables, a scrubbed environment: the parent's
variables, API keys included, are not passed on), in its own process group, SIGKILLed as a group at
the wall-clock deadline and after it exits, with rlimits (CPU seconds,
address space, file size, processes, open files, no core) and stdout/stderr read to at most
`Limits.output_bytes` each. Whatever this kernel allows (probed once, `isolation()`; the layers in
force are logged once and named in `isolation().describe()`, which evals writes into every code
benchmark's protocol), sandbox_init.py adds:
- namespaces: mount, pid, network, ipc, uts (and user, when not started as root): no network at all,
  only its own processes, and everything it started dies with it;
- empty_root: a fresh tmpfs root with only the interpreter, its standard library, the shared
  libraries, four /dev nodes, the jail programs (read-only) and a private 64 MiB /tmp as cwd: no
  repository, no benchmarks, no /proc, no host sockets, nothing of the host writable;
- slot_uid: as root, a uid of its own per concurrent slot (60000 + n), taken with flock on a lock file
  per slot, so two grader processes never share one: RLIMIT_NPROC, kill(-1) and file ownership stay
  within one run;
- no_new_privs, and seccomp (libseccomp: no ptrace, process_vm_*, pidfd_getfd, mount, unshare, ...);
  the jail programs also make themselves not dumpable before any candidate code runs.
`RunResult.network_isolated` records whether a result came from a network-less run. Set
R1_SANDBOX_ISOLATION=none to force the layer-less mode (rlimits and process groups only).
"""

from __future__ import annotations

import ctypes.util
import fcntl
import functools
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
JAIL_DIR = Path(__file__).resolve().parent / "jail"
FORK_SERVER = Path(__file__).resolve().parent / "fork_server.py"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
SANDBOX_UID_BASE = 60000  # per-slot uids 60000..60999 when started as root
UID_SLOTS = 1000
TMP_MB = 64
SETUP_FAILED = 125
ALL_LAYERS = ("namespaces", "empty_root", "slot_uid", "no_new_privs", "seccomp")


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
    status: str  # "ok" | "failed" | "timeout" | "memory" | "output_limit" | "killed" | "stopped" | "error"
    returncode: int | None  # exit code, or -N when killed by signal N
    stdout: str  # empty when a `watch` read the lines
    stderr: str
    wall_s: float
    reason: str  # "ok", "exit code 1: ValueError: ...", "wall-clock limit 2.0s", ...
    network_isolated: bool


@dataclass(frozen=True)
class Isolation:
    layers: tuple[str, ...]  # the layers in force, in ALL_LAYERS order
    interpreter: str  # the Python that runs the programs
    detail: str  # what the probe saw (and why a layer is missing)

    @property
    def mode(self) -> str:
        return "+".join(self.layers) or "none"

    @property
    def network_isolated(self) -> bool:
        return "namespaces" in self.layers

    def describe(self) -> str:
        missing = [layer for layer in ALL_LAYERS if layer not in self.layers]
        return f"sandbox layers: {self.mode}" + (f" (not active: {', '.join(missing)}; {self.detail})" if missing else "")


class Watch(Protocol):
    """Reads a run's stdout line by line as it comes: `feed` returns True to stop the run (the verdict
    is known), and `deadline` (time.monotonic) may move as the run makes progress."""

    deadline: float

    def feed(self, line: bytes) -> bool: ...


# ----------------------------------------------------------------------------- public API


def run_program(source: str, stdin: str | bytes | None = None, limits: Limits = Limits(),
                files: dict[str, str | bytes] | None = None) -> RunResult:
    """Run `source` as a Python program (prog.py in the cwd); `files` are written beside it first."""
    return _run_once({"prog.py": source, **(files or {})}, "prog.py", stdin, limits, None)


def run_jail(program: str, stdin: bytes, limits: Limits, watch: Watch | None = None) -> RunResult:
    """Run evals/jail/<program> (read-only, at /jail inside) with `stdin`; `watch` reads its stdout."""
    return _run_once({}, program, stdin, limits, watch)


@functools.cache
def isolation() -> Isolation:
    """Probe once which layers this machine permits, strongest set first; logged once."""
    iso = _probe_isolation()
    log.info("%s; interpreter %s", iso.describe(), iso.interpreter)
    return iso


# ----------------------------------------------------------------------------- one run


def _run_once(files, program, stdin, limits: Limits, watch: Watch | None, iso: Isolation | None = None):
    iso = iso or isolation()
    start = time.monotonic()
    with _uid_slot("slot_uid" in iso.layers) as uid, tempfile.TemporaryDirectory(
        prefix=f"r1-sandbox-{os.getpid()}-", ignore_cleanup_errors=True
    ) as workdir:
        try:
            cfg = _stage(Path(workdir), files, program, uid, limits, iso)
            proc, stdin_file = _launch(cfg, stdin, iso.interpreter)
        except OSError as e:
            out, err, why, rc = b"", f"sandbox failed to start: {e}".encode(), "error", None
        else:
            with stdin_file:
                deadline = time.monotonic() + limits.wall_s
                out, err, why = _collect(proc, deadline, limits.output_bytes, watch)
            rc = proc.returncode
    status, reason = _classify(rc, err, why, limits)
    return RunResult(status=status, returncode=None if rc is None else _returncode(rc), stdout=out.decode(
        "utf-8", "replace"), stderr=err.decode("utf-8", "replace"), wall_s=time.monotonic() - start,
        reason=reason, network_isolated=iso.network_isolated)


def _stage(workdir: Path, files: dict, program: str, uid: int | None, limits: Limits, iso: Isolation) -> dict:
    stage = workdir / "stage"
    stage.mkdir()
    for name, content in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"sandbox file name {name!r} must be a plain name inside the cwd")
        (stage / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if uid is not None:
            os.chown(stage / name, uid, uid)
    (workdir / "root").mkdir()
    jailed = "empty_root" in iso.layers
    if uid is not None:
        os.chown(stage, uid, uid)
    if files:
        target = ("/tmp/" if jailed else f"{stage}/") + program
    else:
        target = ("/jail/" if jailed else f"{JAIL_DIR}/") + program
    mb = 1 << 20
    cfg = {
        "layers": list(iso.layers), "stage": str(stage), "root": str(workdir / "root"), "uid": uid,
        "program": target, "jail": str(JAIL_DIR), "tmp_mb": TMP_MB, **_root_layout(iso.interpreter),
        "seccomp_lib": _seccomp_lib(),
        "rlimits": {"RLIMIT_CPU": [limits.cpu_s, limits.cpu_s + 1], "RLIMIT_AS": [limits.memory_mb * mb] * 2,
                    "RLIMIT_FSIZE": [limits.file_size_mb * mb] * 2, "RLIMIT_NPROC": [limits.nproc] * 2,
                    "RLIMIT_NOFILE": [limits.nofile] * 2, "RLIMIT_CORE": [0, 0]},
    }
    return cfg


@functools.cache
def _root_layout(interpreter: str) -> dict:
    """What the empty root holds: the interpreter's prefix (minus site-packages) and the system libs."""
    prefix = os.path.dirname(os.path.dirname(interpreter))
    site = sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix})
    binds = [prefix] + [p for p in ("/usr/lib", "/usr/lib64") if os.path.isdir(p) and not (
        p + "/").startswith(prefix + "/") and not (prefix + "/").startswith(p + "/")]
    links = {f"/{name}": f"usr/{name}" for name in ("lib", "lib64") if os.path.islink(f"/{name}")}
    return {"ro_binds": binds, "hide": [site] if os.path.isdir(site) else [], "symlinks": links}


@functools.cache
def _seccomp_lib() -> str | None:
    return ctypes.util.find_library("seccomp")  # (it runs ldconfig: once here, not in every sandbox)


def _launch(cfg: dict, stdin, interpreter: str) -> tuple[_Spawned, object]:
    # stdin comes from an unlinked temp file: no pipe to feed, nothing left on disk.
    stdin_file = tempfile.TemporaryFile()
    if stdin is not None:
        stdin_file.write(stdin.encode() if isinstance(stdin, str) else stdin)
        stdin_file.seek(0)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    try:
        proc = _spawn(cfg, [stdin_file.fileno(), out_w, err_w], interpreter)
    except BaseException:
        stdin_file.close()
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    proc.stdout, proc.stderr = open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0)
    return proc, stdin_file


class _Spawned:
    """One sandbox run started by the fork server: its pipes, and its exit status when it comes."""

    def __init__(self, server: _ForkServer, run_id: str):
        self.server, self.id = server, run_id
        self.stdout = self.stderr = None
        self.returncode: int | None = None
        self.done = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        self.done.wait()
        return self.returncode

    def kill_group(self) -> None:
        if not self.done.is_set():
            self.server.send({"id": self.id, "kill": True})


class _ForkServer:
    """evals/fork_server.py, started once per grader process (again if it dies)."""

    def __init__(self, interpreter: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([interpreter, "-I", "-S", str(FORK_SERVER), str(theirs.fileno())],
                                     env=ENV, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn, self.owner = ours, os.getpid()
        self.lock, self.runs, self.alive = threading.Lock(), {}, True
        threading.Thread(target=self._read, name="sandbox-fork-server", daemon=True).start()

    def spawn(self, cfg: dict, fds: list[int]) -> _Spawned:
        run = _Spawned(self, f"{os.getpid()}-{next(_run_ids)}")
        with self.lock:
            if not self.alive:
                raise OSError("the sandbox fork server has stopped")
            self.runs[run.id] = run
            socket.send_fds(self.conn, [json.dumps({"id": run.id, "spawn": cfg}).encode()], fds)
        return run

    def stop(self) -> None:
        with self.lock:
            self.alive = False
        try:
            self.conn.shutdown(socket.SHUT_RDWR)  # the server exits; the reader ends the runs it had
        except OSError:
            pass

    def send(self, message: dict) -> None:
        with self.lock:
            if self.alive:
                self.conn.send(json.dumps(message).encode())

    def _receive(self) -> bytes:
        try:
            return self.conn.recv(1 << 16)
        except OSError:
            return b""

    def _read(self) -> None:
        while (data := self._receive()):
            message = json.loads(data)
            with self.lock:
                run = self.runs.pop(message["id"])
            run.returncode = message["status"]
            run.done.set()
        with self.lock:  # the server died: every run it had is over
            self.alive = False
            runs, self.runs = list(self.runs.values()), {}
        for run in runs:
            run.returncode = -signal.SIGKILL
            run.done.set()


_server_lock = threading.Lock()
_server: _ForkServer | None = None
_run_ids = itertools.count()


def _spawn(cfg: dict, fds: list[int], interpreter: str) -> _Spawned:
    """Start a run on the fork server, on a new one if the last one died (once)."""
    server = _fork_server(interpreter)
    try:
        return server.spawn(cfg, fds)
    except OSError:
        server.stop()
        return _fork_server(interpreter).spawn(cfg, fds)


def _fork_server(interpreter: str) -> _ForkServer:
    global _server
    with _server_lock:
        if _server is None or not _server.alive or _server.owner != os.getpid():
            _server = _ForkServer(interpreter)
        return _server


def _collect(proc: _Spawned, deadline: float, cap: int, watch: Watch | None) -> tuple[bytes, bytes, str]:
    """Read both pipes to EOF, the deadline, the cap or the watch's stop; always leaves the group dead
    and reaped. With a watch, stdout lines go to it (each capped at `cap`) instead of the result."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    why_stopped = ""
    with selectors.DefaultSelector() as sel:
        for pipe in bufs:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map() and not why_stopped:
            remaining = (watch.deadline if watch else deadline) - time.monotonic()
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
                if watch and key.fileobj is proc.stdout:
                    why_stopped = _feed(watch, buf, chunk, cap)
                    continue
                buf += chunk[: cap - len(buf)]
                if len(buf) >= cap:
                    why_stopped = "output_limit"
    _kill_group(proc)
    for pipe in bufs:
        pipe.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), why_stopped


def _feed(watch: Watch, buf: bytearray, chunk: bytes, cap: int) -> str:
    buf += chunk
    while (end := buf.find(b"\n")) >= 0:
        line = bytes(buf[:end])
        del buf[: end + 1]
        if watch.feed(line):
            return "stopped"
    return "output_limit" if len(buf) >= cap else ""


def _kill_group(proc: _Spawned) -> None:
    # Also after a clean exit: background children of the program must not linger.
    proc.kill_group()
    proc.wait()


# ----------------------------------------------------------------------------- verdicts


def _returncode(rc: int) -> int:
    return -(rc - 128) if rc > 128 else rc  # sandbox_init reports a program killed by signal N as 128+N


def _classify(rc, err: bytes, why_stopped: str, limits: Limits) -> tuple[str, str]:
    if why_stopped == "error":
        return "error", err.decode()
    if why_stopped == "stopped":
        return "stopped", "stopped by the grader"
    if why_stopped == "timeout":
        return "timeout", f"wall-clock limit {limits.wall_s}s"
    if why_stopped == "output_limit":
        return "output_limit", f"output over {limits.output_bytes} bytes"
    if rc == SETUP_FAILED and b"sandbox setup failed" in err:
        return "error", _last_line(err)
    sig = -_returncode(rc) if rc < 0 or rc > 128 else None
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


def _base_interpreter() -> str:
    # -S drops site-packages anyway, so the base interpreter behaves as the venv's would.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _probe_isolation() -> Isolation:
    python = _base_interpreter()
    forced = os.environ.get("R1_SANDBOX_ISOLATION", "")
    if forced == "none":
        return Isolation((), python, "forced by R1_SANDBOX_ISOLATION=none")
    if forced:
        raise ValueError(f"R1_SANDBOX_ISOLATION={forced!r}: only 'none' (or unset) is understood")
    wanted = [layer for layer in ALL_LAYERS if layer != "slot_uid" or os.geteuid() == 0]
    notes = [] if os.geteuid() == 0 else ["slot_uid needs root"]
    if not _seccomp_lib():
        wanted.remove("seccomp")
        notes.append("libseccomp not found")
    attempts = [wanted, [x for x in wanted if x != "seccomp"], ["no_new_privs"]]
    for layers in attempts:
        ok, detail = _probe(Isolation(tuple(layers), python, "probe"))
        if ok:
            return Isolation(tuple(layers), python, "; ".join([*notes, detail]))
        notes.append(f"{'+'.join(layers)} failed: {detail}")
    return Isolation((), python, "; ".join(notes))


def _probe(iso: Isolation) -> tuple[bool, str]:
    """Run a tiny program the way run_program would; it must start and (with namespaces) find no network."""
    probe = (
        "import os, socket, sys\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n"
        "    print('network')\nexcept OSError:\n    print(sys.version.split()[0], os.getuid(), os.listdir('/'))\n"
    )
    res = _run_once({"prog.py": probe}, "prog.py", None, Limits(), None, iso)
    if res.status != "ok" or not res.stdout.strip() or (iso.network_isolated and "network" in res.stdout):
        return False, f"{res.status}: {res.reason}"
    return True, f"Python {res.stdout.split()[0]}"


def _slot_dir() -> Path:
    path = Path("/run/r1-sandbox-slots") if os.access("/run", os.W_OK) else Path(
        tempfile.gettempdir()) / f"r1-sandbox-slots-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class _uid_slot:
    """A uid that no other live run uses, in this process or any other: flock on one file per slot."""

    def __init__(self, wanted: bool):
        self.wanted = wanted
        self.fd = None

    def __enter__(self) -> int | None:
        if not self.wanted:
            return None
        folder = _slot_dir()
        for slot in range(UID_SLOTS):
            fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd = fd
            return SANDBOX_UID_BASE + slot
        raise RuntimeError(f"more than {UID_SLOTS} concurrent sandbox runs on this machine")

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock

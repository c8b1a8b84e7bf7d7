"""A pre-started process that forks each sandbox (evals/sandbox_init.py) from a warm interpreter.

    python -I -S evals/fork_server.py FD    # started by evals/sandbox.py, once per grader process

Starting `python` for every candidate costs more than everything else a sandbox run does (the
interpreter, json, ctypes, the jail programs' imports). This server pays it once: it imports all of
that, then for each request (a config and three fds: stdin, stdout, stderr) forks a child that leaves
its process group and becomes the sandbox (`sandbox_init.run`), exactly as a fresh `python
sandbox_init.py` would. Single-threaded, so forking is safe; it reaps its children and reports each
exit status, and kills a run's process group only while that run is still its unreaped child (so a
kill can never reach a reused pid). Requests come on fd FD, a SOCK_SEQPACKET Unix socket, one JSON
message each: {"id", "spawn": cfg} (the three fds attached) and {"id", "kill": true}; it replies
{"id", "status"} when a run ends. When the socket closes it kills every run left and exits.
"""

import importlib
import json
import os
import select
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "jail")]
import sandbox_init  # noqa: E402

WARM = [importlib.import_module(name) for name in ("channel", "plain", "mbpp_inputs", "ast", "copy", "runpy")]
del sys.path[:2]


def main() -> None:
    conn = socket.socket(fileno=int(sys.argv[1]))  # SOCK_SEQPACKET: one request per message, its fds with it
    live: dict[int, str] = {}  # pid -> request id
    while True:
        select.select([conn], [], [], 0.05)
        _reap(conn, live)
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not data:  # the grader is gone
            for pid in live:
                os.killpg(pid, signal.SIGKILL)
            return
        request = json.loads(data)
        if "spawn" in request:
            _spawn(conn, request, fds, live)
        elif request.get("kill"):
            pid = next((p for p, rid in live.items() if rid == request["id"]), None)
            if pid is not None:
                os.killpg(pid, signal.SIGKILL)


def _spawn(conn, request: dict, fds: list[int], live: dict) -> None:
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group, which the kill request targets
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)  # the socket to the grader included
        sandbox_init.run(request["spawn"])  # never returns
    for fd in fds:
        os.close(fd)
    live[pid] = request["id"]


def _reap(conn, live: dict) -> None:
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        _reply(conn, {"id": live.pop(pid), "status": code})


def _reply(conn, message: dict) -> None:
    conn.send(json.dumps(message).encode())


if __name__ == "__main__":
    main()

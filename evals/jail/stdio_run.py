"""In the sandbox: run a script once per case, with the case's stdin, and send what it printed.

Payload (one part): code, inputs (one stdin text per case), time_limit (seconds per case). Each case
runs in a forked child; this process, which the child cannot reach (not dumpable), sends per case
{"rc": exit code | "timeout", "err": last stderr line, "digest": sha256 of the normalised stdout}.
The expected outputs never enter the sandbox: the grader compares the digests outside.
"""

import os
import select
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channel import not_dumpable, open_results, read_part
from plain import printed_digest


def main():
    not_dumpable()
    payload = read_part()
    result_fd, send = open_results()
    try:
        code = compile(payload["code"], "solution.py", "exec")
    except BaseException as e:
        return send({"error": f"{type(e).__name__}: {e}"[:500]})
    for i, stdin_text in enumerate(payload["inputs"]):
        rc, out, err = _case(code, stdin_text, payload["time_limit"], i, result_fd)
        lines = err.strip().splitlines() or ["(no stderr)"]
        send({"rc": rc, "err": lines[-1][-300:], "digest": printed_digest(out)})


def _case(code, stdin_text: str, time_limit: float, i: int, result_fd: int):
    names = [f"case{i}.{x}" for x in ("in", "out", "err")]
    for name, text in zip(names, (stdin_text, "", ""), strict=True):
        with open(name, "w") as f:
            f.write(text)
    pid = os.fork()
    if pid == 0:
        _child(code, names, result_fd)
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], time_limit)[0]
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    os.close(pidfd)
    with open(names[1], errors="replace") as f:
        out = f.read()
    with open(names[2], errors="replace") as f:
        err = f.read()[-2000:]
    for name in names:
        os.unlink(name)
    return ("timeout" if timed_out else os.waitstatus_to_exitcode(status)), out, err


def _child(code, names: list[str], result_fd: int):
    """The candidate's process for one case: never returns."""
    rc = 1
    try:
        os.close(result_fd)
        for fd, name in enumerate(names):
            os.dup2(os.open(name, os.O_WRONLY if fd else os.O_RDONLY), fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        try:
            exec(code, {"__name__": "__main__"})
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


if __name__ == "__main__":
    main()
    os._exit(0)

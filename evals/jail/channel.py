"""The jail programs' side of the grader's protocol.

stdin carries the payload as parts, each `<length>\\n<JSON>`, read without read-ahead so that a
program can fork before reading a part its child must not see. Results go out as lines on the
original stdout, `<JSON header>` or `<JSON header>\\t<plain-data text>`; fds 0 and 1 then point at
/dev/null, so nothing the candidate prints can land between them. What a line says is only data: the
grader outside decides what it is worth.
"""

import ctypes
import json
import os

PR_SET_DUMPABLE = 4


def not_dumpable() -> None:
    """No ptrace, /proc/<pid>/mem or pidfd_getfd on this process by anything without CAP_SYS_PTRACE."""
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def read_part(fd: int = 0):
    size = int(_read_exact(fd, 0, until=b"\n"))
    return json.loads(_read_exact(fd, size))


def _read_exact(fd: int, size: int, until: bytes = b"") -> bytes:
    data = b""
    while (not until and len(data) < size) or (until and not data.endswith(until)):
        chunk = os.read(fd, 1 if until else size - len(data))
        if not chunk:
            raise EOFError("the payload ended early")
        data += chunk
    return data


def open_results():
    """A private copy of stdout for results; fds 0 and 1 go to /dev/null. Returns send(header, text)."""
    out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)

    def send(header: dict, text: str = "") -> None:
        data = (json.dumps(header) + ("\t" + text if text else "") + "\n").encode()
        while data:  # a pipe may take a large write in pieces
            data = data[os.write(out, data):]

    return out, send

"""In the sandbox: a program's test code, run against a candidate that lives in another process.

Payload part 1: {"code": the candidate program}. This process forks the candidate process BEFORE it
reads part 2 ({"test": test code, "prefix": trusted code the tests may use, "entry_point": ...}), so
the candidate never holds the tests or their expected values. The candidate process runs its code,
names its top-level callables, then answers calls: arguments in, result out, both as plain data
(plain.py). Here the tests run, after the prefix and the candidate's top-level import statements
(parsed, not run as its code: its `import math` serves the tests as in one program), against proxies
of those callables (the entry point, and any other that the prefix and imports do not define), and
compare what came back, builtin values only: a candidate's custom `__eq__`, monkeypatch or forged "done" line cannot
reach this process (another process, not dumpable, its result fd closed in the candidate).
Line out: {"passed": true} or {"failed": "<first failure>"} or {"error": "..."}.
"""

import ast
import builtins
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channel import not_dumpable, open_results, read_part
from plain import Unencodable, dumps, loads

_MAX_MESSAGE = 64 << 20


class CandidateGone(BaseException):  # BaseException: a test's `except Exception` must not hide it
    pass


def main():
    not_dumpable()
    candidate = read_part()
    payload_fd = os.dup(0)
    _, send = open_results()
    (to_us, from_them), (to_them, from_us) = os.pipe(), os.pipe()
    if os.fork() == 0:
        _serve((to_them, from_them), candidate["code"])  # closes every other fd but stderr
    os.close(to_them)
    os.close(from_them)
    ours = (to_us, from_us)
    sys.set_int_max_str_digits(0)
    tests = read_part(payload_fd)
    try:
        send(_run_tests(tests, candidate["code"], ours))
    except BaseException as e:
        send({"error": f"the test harness failed: {type(e).__name__}: {e}"[:500]})


def _run_tests(tests: dict, code: str, conn) -> dict:
    offered = {}
    try:
        offered = _receive(conn)
        functions = [name for name in offered["functions"] if isinstance(name, str)]
    except (CandidateGone, TypeError, KeyError, ValueError) as e:
        why = offered.get("error", e) if isinstance(offered, dict) else e
        return {"failed": f"loading the program: {why}"[:500]}
    namespace = {"__name__": "__main__"}
    try:  # the benchmark's own code before the candidate's (HumanEval's helpers such as poly)
        exec(compile(tests.get("prefix") or "", "prompt.py", "exec"), namespace)
    except BaseException:
        namespace = {"__name__": "__main__"}  # a prose prompt, not code
    _imports_of(code, namespace)
    entry = tests.get("entry_point")
    for name in functions:
        if name == entry or name not in namespace:
            namespace[name] = _proxy(conn, name)
    try:
        exec(compile(tests["test"], "tests.py", "exec"), namespace)
        if entry:
            namespace["check"](namespace.get(entry) or _proxy(conn, entry))
    except CandidateGone as e:
        return {"failed": str(e)}
    except BaseException as e:
        return {"failed": _where(e, tests["test"])}
    return {"passed": True}


def _imports_of(code: str, namespace: dict) -> None:
    """Run the candidate's top-level import statements here, one by one."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module([node], []), "imports.py", "exec"), namespace)
            except BaseException:  # an import the tests may not even need
                continue


def _where(e: BaseException, test: str) -> str:
    """The exception, and the last line of the tests it passed through."""
    tb, lineno = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "tests.py":
            lineno = tb.tb_lineno
        tb = tb.tb_next
    lines = test.splitlines()
    line = f" (tests line {lineno}: {lines[lineno - 1].strip()})" if lineno and lineno <= len(lines) else ""
    return f"{type(e).__name__}: {e}"[:200] + line[:200]


def _proxy(conn, name):
    def call(*args, **kwargs):
        _send(conn, {"call": name, "args": dumps([list(args), kwargs])[0]})
        reply = _receive(conn)
        if isinstance(reply, dict) and "value" in reply and isinstance(reply["value"], str):
            try:
                return loads(reply["value"])
            except (TypeError, ValueError, KeyError, RecursionError) as e:
                raise CandidateGone(f"the candidate sent a malformed value: {type(e).__name__}") from None
        raised = reply.get("raised") if isinstance(reply, dict) else None
        if not (isinstance(raised, list) and len(raised) == 2 and all(isinstance(x, str) for x in raised)):
            raise CandidateGone("the candidate sent a malformed reply")
        error = getattr(builtins, raised[0], None)
        raise (error if isinstance(error, type) and issubclass(error, Exception) else RuntimeError)(raised[1])

    call.__name__ = name
    return call


def _serve(conn: tuple[int, int], code: str):
    """The candidate process: never returns."""
    for fd in range(3, 1 << 10):  # under RLIMIT_NOFILE: the result fd, the payload, the other pipe ends
        if fd not in conn:
            try:
                os.close(fd)
            except OSError:
                pass
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as e:
        _send(conn, {"error": f"{type(e).__name__}: {e}"[:300]})
        os._exit(0)
    functions = [k for k, v in namespace.items() if callable(v) and not k.startswith("__")]
    _send(conn, {"functions": functions})
    while True:
        try:
            request = _receive(conn)
        except CandidateGone:
            os._exit(0)
        args, kwargs = loads(request["args"])
        try:
            reply = {"value": dumps(namespace[request["call"]](*args, **kwargs))[0]}
        except (Exception, Unencodable) as e:
            reply = {"raised": [type(e).__name__, str(e)[:300]]}
        _send(conn, reply)


def _send(conn: tuple[int, int], message: dict) -> None:
    data = memoryview(len(text := dumps(message)[0].encode()).to_bytes(8, "big") + text)
    while data:
        data = data[os.write(conn[1], data):]


def _receive(conn: tuple[int, int]) -> dict:
    head = _recv_exact(conn, 8)
    size = int.from_bytes(head, "big")
    if size > _MAX_MESSAGE:
        raise CandidateGone(f"the candidate sent a {size}-byte message")
    return loads(_recv_exact(conn, size).decode())


def _recv_exact(conn: tuple[int, int], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.read(conn[0], min(size - len(data), 1 << 20))
        if not chunk:
            raise CandidateGone("the candidate process ended before the tests finished")
        data += chunk
    return bytes(data)


if __name__ == "__main__":
    main()
    os._exit(0)

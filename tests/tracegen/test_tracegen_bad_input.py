"""Bad input to python -m tracegen ends in one line naming the file (exit 2) and loses nothing: problem files that
are not UTF-8 or not Parquet, run parts cut short before a resume; a garbage journal is set aside with a warning."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fake_openai import FakeOpenAIServer
from tracegen.main import main
from tracegen.store import read_traces

PROMPTS = ["[answer:1]", "[answer:2]", "[answer:3]"]


def write_problems(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": p}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def argv(problems, out, base_url, *flags):
    return ["--problems", str(problems), "--output_dir", str(out), "--base_url", base_url, "--n", "2",
            "--top_logprobs", "2", "--shard_rows", "4", *flags]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (traces/, logprobs/, problems/ parts) to damage, and its problem file."""
    root = tmp_path_factory.mktemp("finished")
    problems = write_problems(root / "p.jsonl")
    with FakeOpenAIServer() as server:
        assert main(argv(problems, root / "run", server.base_url)) == 0
    return root / "run", problems


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad, message", [  # "bad" follows one good line
    (b'{"id": "a", "domain": "math", "prompt": "caf\xe9"}\n', "p.jsonl:2: not UTF-8 text (byte 0xe9 at column 45)"),
    (b"PAR1 not really parquet", "p.parquet: not a readable Parquet file"),  # the whole file
], ids=["not-utf8", "corrupt-parquet"])
def test_a_problem_file_that_is_not_utf8_or_parquet_is_named(tmp_path, server, caplog, bad, message):
    if message.startswith("p.jsonl"):
        path = tmp_path / "p.jsonl"
        path.write_bytes(b'{"id": "b", "domain": "math", "prompt": "fine"}\n' + bad)
    else:
        path = tmp_path / "p.parquet"
        path.write_bytes(bad)
    assert main(argv(path, tmp_path / "run", server.base_url)) == 2
    assert message in caplog.text and not (tmp_path / "run").exists() and not server.chat_requests()


@pytest.mark.parametrize("sub", ["traces", "logprobs"])
def test_a_part_cut_short_stops_the_resume_and_is_named(tmp_path, finished, server, caplog, sub):
    run, problems = finished
    run = shutil.copytree(run, tmp_path / "run")
    part = sorted((run / sub).glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])  # a partial copy
    before = snapshot(run)
    assert main(argv(problems, run, server.base_url)) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(f"{part}: not a readable Parquet part") and "move it out of" in line
    assert ("move traces/" + part.name) in line if sub == "logprobs" else "generated again" in line
    assert snapshot(run) == before and not server.chat_requests()  # nothing written, nothing asked


def test_a_problems_part_cut_short_is_written_again(tmp_path, finished, server, caplog):
    run, problems = finished
    run = shutil.copytree(run, tmp_path / "run")
    (kept,) = (run / "problems").glob("*.parquet")
    good = pq.read_table(kept)
    kept.write_bytes(kept.read_bytes()[:-50])
    assert main(argv(problems, run, server.base_url)) == 0
    assert f"{kept}: unreadable" in caplog.text and "written again from the problem source" in caplog.text
    assert pq.read_table(kept).equals(good) and not server.chat_requests()  # every trace was done already


def test_a_garbage_journal_is_set_aside_with_a_warning(tmp_path, finished, server, caplog):
    run, problems = finished
    run = shutil.copytree(run, tmp_path / "run")
    journal = run / "traces" / ".part-0of1-000099.journal.arrow"
    journal.write_bytes(b"\x00garbage, not an Arrow stream" * 10)
    done = read_traces(run)["trace_id"].to_pylist()
    assert main(argv(problems, run, server.base_url)) == 0
    aside = journal.with_name(journal.name + ".corrupt")
    assert aside.read_bytes() == b"\x00garbage, not an Arrow stream" * 10 and not journal.exists()
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith(f"{journal}: unreadable after 0 complete rows") and f"set aside as {aside.name}" in warning
    assert sorted(read_traces(run)["trace_id"].to_pylist()) == sorted(done)


def test_a_journal_of_another_schema_is_set_aside_not_mixed_in(tmp_path, finished, server, caplog):
    run, problems = finished
    run = shutil.copytree(run, tmp_path / "run")
    journal = run / "logprobs" / ".part-0of1-000099.journal.arrow"
    (run / "traces" / journal.name).write_bytes(b"")  # its trace journal: empty (the crash came first)
    table = pa.table({"trace_id": ["x"], "other": [1]})  # e.g. a logprob journal of an older schema
    with pa.ipc.new_stream(journal, table.schema) as writer:
        writer.write_table(table)
    assert main(argv(problems, run, server.base_url)) == 0
    assert journal.with_name(journal.name + ".corrupt").is_file()
    assert "its columns are not those of logprobs" in caplog.text

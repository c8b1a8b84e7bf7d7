import pyarrow.parquet as pq
import pytest

from data.config import ConfigError
from tracegen.store import ShardWriter, done_trace_ids, read_traces


def trace(tid, error=None):
    return {"trace_id": tid, "request_key": "k", "problem_id": "p", "sample_index": 0, "model": "m",
            "messages": "[]", "reasoning": "r", "content": "c", "reasoning_source": "field",
            "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 2, "reasoning_tokens": None,
            "latency_s": 0.1, "attempts": 1, "error": error, "sampling": "{}", "created_at": None}


def logprob(tid):
    return {"trace_id": tid, "token_ids": [1, 2], "logprobs": [-0.125, -0.25], "top_ids": [[1, 3], [2, 4]],
            "top_logprobs": [[-0.125, -2.0], [-0.25, -3.0]], "rest_logprobs": [-3.0, -2.5], "prompt_token_ids": [5, 6]}


def parts(run, sub="traces"):
    return sorted(p.name for p in (run / sub).glob("part-*.parquet"))


def test_rolls_parts_and_closes_the_tail(tmp_path):
    writer = ShardWriter(tmp_path, (0, 1), rows_per_part=3, logprobs=True)
    for i in range(7):
        writer.append([trace(f"t{i}")], [logprob(f"t{i}")])
    writer.close()
    assert parts(tmp_path) == ["part-0of1-000000.parquet", "part-0of1-000001.parquet", "part-0of1-000002.parquet"]
    assert parts(tmp_path, "logprobs") == parts(tmp_path)
    assert read_traces(tmp_path)["trace_id"].to_pylist() == [f"t{i}" for i in range(7)]
    assert not list(tmp_path.rglob("*.journal.arrow"))
    lp = pq.read_table(tmp_path / "logprobs" / "part-0of1-000002.parquet").to_pylist()
    assert lp == [logprob("t6")]


def test_a_crash_loses_nothing_journaled_and_drops_a_torn_batch(tmp_path):
    writer = ShardWriter(tmp_path, (0, 1), rows_per_part=100, logprobs=True)
    for i in range(5):
        writer.append([trace(f"t{i}")], [logprob(f"t{i}")])
    journal = next((tmp_path / "traces").glob("*.journal.arrow"))
    # a crash: the process dies without close(); its last batch is torn halfway
    size = journal.stat().st_size
    writer.append([trace("torn")], [logprob("torn")])
    with journal.open("r+b") as f:
        f.truncate(size + (journal.stat().st_size - size) // 2)
    writer._lock.close()

    again = ShardWriter(tmp_path, (0, 1), rows_per_part=100, logprobs=True)
    assert again.recovered == 5
    assert read_traces(tmp_path)["trace_id"].to_pylist() == [f"t{i}" for i in range(5)]
    # the torn trace's logprobs reached their journal, but a logprob row without its trace is dropped
    lp = pq.read_table(tmp_path / "logprobs" / "part-0of1-000000.parquet")
    assert lp["trace_id"].to_pylist() == [f"t{i}" for i in range(5)]
    again.append([trace("t5")], [logprob("t5")])
    again.close()
    assert parts(tmp_path) == ["part-0of1-000000.parquet", "part-0of1-000001.parquet"]
    assert sorted(done_trace_ids(tmp_path)) == [f"t{i}" for i in range(6)]


def test_stale_journal_of_a_finished_part_is_discarded(tmp_path):
    writer = ShardWriter(tmp_path, (0, 1), rows_per_part=100, logprobs=False)
    writer.append([trace("t0")], [])
    journal = next((tmp_path / "traces").glob("*.journal.arrow"))
    saved = journal.read_bytes()
    writer.close()  # part 0 written, journal removed; now pretend the crash came before the unlink
    journal.write_bytes(saved)
    before = (tmp_path / "traces" / "part-0of1-000000.parquet").read_bytes()
    ShardWriter(tmp_path, (0, 1), rows_per_part=100, logprobs=False).close()
    assert (tmp_path / "traces" / "part-0of1-000000.parquet").read_bytes() == before
    assert read_traces(tmp_path)["trace_id"].to_pylist() == ["t0"]


def test_done_ids_exclude_errors_and_one_writer_per_shard(tmp_path):
    writer = ShardWriter(tmp_path, (1, 2), rows_per_part=100, logprobs=False)
    with pytest.raises(ConfigError, match="another tracegen process is writing this shard"):
        ShardWriter(tmp_path, (1, 2), rows_per_part=100, logprobs=False)
    other = ShardWriter(tmp_path, (0, 2), rows_per_part=100, logprobs=False)  # other shards are independent
    writer.append([trace("ok"), trace("bad", error="HTTP 500")], [])
    other.append([trace("ok2")], [])
    writer.close()
    other.close()
    assert done_trace_ids(tmp_path) == {"ok", "ok2"}
    assert parts(tmp_path) == ["part-0of2-000000.parquet", "part-1of2-000000.parquet"]

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.toyworld.problems import gold_conversation, read_jsonl


@pytest.fixture(scope="session")
def curated(toyworld, tmp_path_factory):
    """A curated folder as filter exports it: 48 gold conversations of the toy world, reasoning inline in
    <think>, with trace and problem ids."""
    folder = tmp_path_factory.mktemp("curated")
    rows = []
    for p in read_jsonl(toyworld.train)[:48]:
        user, gold = gold_conversation(p)
        content = f"<think>\n{gold['reasoning_content']}\n</think>\n\n{gold['content']}"
        rows.append({"messages": [user | {"reasoning_content": None},
                                  {"role": "assistant", "content": content, "reasoning_content": None}],
                     "trace_id": f"t-{p['id']}", "problem_id": p["id"]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    return folder

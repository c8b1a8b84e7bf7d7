"""Export the selected traces as the curated SFT dataset (read by the sft stage):

    <output_dir>/train-00000-of-0000N.parquet   datasets.load_dataset("parquet", data_files=".../*.parquet")
    <output_dir>/funnel.json, card.md, *.png     what was kept and why (filter/card.py)

Columns: `messages` (the prompt turns exactly as sent, then the assistant turn: with reasoning_format
think_tags its content is "<think>\\n{reasoning}\\n</think>\\n\\n{answer}", both stripped; with `field` the content
is the answer and `reasoning_content` the reasoning), trace_id, problem_id, sample_index, teacher_model, domain,
difficulty, prompt_tokens (as the teacher's server counted them: sft's KD checks its own prompt against it),
completion_tokens, verdict, completion_token_ids (the teacher's sampled token ids from the
logprobs table, else null) and logprobs_file (the logprobs part holding the trace, relative to output_dir).
The files go to a new folder that filter/store.py's switch makes <output_dir> once the run finishes, so
readers never see it half-written.
"""

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from filter.config import FilterConfig, is_url

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string())])
CURATED_SCHEMA = pa.schema([
    ("messages", pa.list_(MESSAGE)), ("trace_id", pa.string()), ("problem_id", pa.string()),
    ("sample_index", pa.int32()), ("teacher_model", pa.string()), ("domain", pa.string()),
    ("difficulty", pa.int32()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("verdict", pa.string()),
    ("completion_token_ids", pa.list_(pa.int32())), ("logprobs_file", pa.string()),
])
EXPORT_QUERY = """
    SELECT t.messages, t.reasoning, t.content, t.trace_id, t.problem_id, t.sample_index, t.model AS teacher_model,
           p.domain, p.difficulty, t.prompt_tokens, t.completion_tokens, v.verdict, l.token_ids AS completion_token_ids, l.file
    FROM selected x JOIN traces t USING (trace_id)
    LEFT JOIN problems p USING (problem_id) LEFT JOIN verified v USING (trace_id)
    LEFT JOIN (SELECT trace_id, any_value(token_ids) AS token_ids, any_value(file) AS file FROM logprobs
               WHERE trace_id IN (SELECT trace_id FROM selected) GROUP BY trace_id) l USING (trace_id)
    ORDER BY t.problem_id, t.sample_index, t.trace_id"""
BATCH_ROWS = 10_000


def export(con, cfg: FilterConfig, folder: Path, write_extras) -> int:
    """Write the curated set into `folder`, a new folder beside output_dir (write_extras(folder) adds the card);
    returns the number of rows."""
    out = Path(cfg.output_dir)
    folder.mkdir(parents=True)
    total = con.execute("SELECT count(*) FROM selected").fetchall()[0][0]
    reader = con.sql(EXPORT_QUERY).to_arrow_reader(BATCH_ROWS)
    tables = (pa.Table.from_pylist([to_example(r, cfg.reasoning_format, out) for r in batch.to_pylist()],
                                   schema=CURATED_SCHEMA) for batch in reader)
    try:
        write_files(tables, folder, total, cfg.rows_per_file)
    finally:
        reader.close()  # the connection runs nothing else while a result is open
    write_extras(folder)
    return total


def write_files(tables, folder: Path, total: int, per_file: int) -> None:
    """`total` rows from an iterator of tables into train-XXXXX-of-YYYYY.parquet files of `per_file` rows."""
    n_files = max(1, math.ceil(total / per_file))
    buffer = CURATED_SCHEMA.empty_table()
    for index in range(n_files):
        with pq.ParquetWriter(folder / f"train-{index:05d}-of-{n_files:05d}.parquet", CURATED_SCHEMA,
                              compression="zstd") as writer:
            want = min(per_file, total - index * per_file)  # 0 for an empty set: a valid file with no rows
            while want > 0:
                buffer = buffer if buffer.num_rows else next(tables)
                take, buffer = buffer.slice(0, want), buffer.slice(want)
                writer.write_table(take)
                want -= take.num_rows


def to_example(row: dict, reasoning_format: str, out: Path) -> dict:
    row = dict(row)  # its text columns are popped below; the caller's row stays whole
    prompt = [{"role": m["role"], "content": m.get("content"), "reasoning_content": None}
              for m in json.loads(row["messages"])]
    reasoning, answer = (row["reasoning"] or "").strip(), (row["content"] or "").strip()
    if reasoning_format == "think_tags":
        turn = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}", "reasoning_content": None}
    else:
        turn = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    file = row.pop("file")
    for name in ("messages", "reasoning", "content"):
        row.pop(name)
    logprobs_file = None if file is None else file if is_url(file) else os.path.relpath(file, out.resolve())
    return {"messages": [*prompt, turn], **row, "logprobs_file": logprobs_file}

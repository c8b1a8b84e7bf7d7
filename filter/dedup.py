"""Duplicate problems: exact (same normalized text) and near (MinHash/LSH over word shingles), one representative each.

    from filter.dedup import label_duplicates
    label_duplicates(con, threshold=0.8, num_perm=128, shingle=5)   # reads `problems`, fills `dup_problems`

Normalized text: the words (filter/words.py: lowercased runs of `\\w`, as filter/contamination.py's) joined
by one space, so case, whitespace and punctuation never matter ("What is 2+2?" == "what is 2 + 2"). Its md5
(`norm_hash`, 16 hex digits) groups exact duplicates.

Near duplicates: every problem gets a MinHash signature of its word `shingle`-grams (words hashed by
DuckDB's hash(), shingles and num_perm multiply-shift permutations vectorized in numpy; a text shorter than
a shingle is one shingle). The signature is cut into the b bands of r rows that datasketch's MinHashLSH
picks for `threshold` and `num_perm`; two problems sharing a band hash are candidates, and a candidate whose
estimated Jaccard (share of equal signature values) is >= threshold is a near duplicate.

Clusters and representatives: problems are labeled in problem_id order, exact groups first. A group's first
problem is its head (`exact_of` of the others); a head that is a near duplicate of an earlier representative
(the most similar one, then the smallest id) joins that representative's cluster, else it is a
representative itself. So `coalesce(near_of, exact_of, problem_id)` is every problem's representative, and
exactly one problem per cluster has `representative = true`. Greedy against representatives only: a chain
a~b~c with a and c dissimilar does not collapse into one cluster.

Incremental: only problems not in `dup_problems` yet are labeled. Representatives keep their signature in
`dup_signatures` (with the MinHash settings that made it), so a rerun compares new problems with the old
representatives without re-hashing them; an old representative stays one (labels never change), and a new
problem that duplicates it points to it. Changing num_perm or shingle re-hashes the old representatives from
`problems`.
"""

import logging

import duckdb
import numpy as np
import pyarrow as pa

from filter.store import transaction
from filter.words import VERSION as WORDS_VERSION
from filter.words import word_function, words_sql

log = logging.getLogger(__name__)

MINHASH_VERSION = f"minhash-v1 {WORDS_VERSION}"  # bump when the hashing changes: stored signatures are recomputed
_CHUNK_SHINGLES = 50_000  # shingles hashed per numpy batch (x num_perm x 8 bytes x ~3 of temporary memory)

DUP_PROBLEMS = """CREATE TABLE IF NOT EXISTS dup_problems (problem_id VARCHAR PRIMARY KEY, norm_hash VARCHAR,
    exact_of VARCHAR, near_of VARCHAR, jaccard DOUBLE, representative BOOLEAN)"""
DUP_SIGNATURES = """CREATE TABLE IF NOT EXISTS dup_signatures (problem_id VARCHAR PRIMARY KEY, minhash VARCHAR,
    signature UINTEGER[])"""
LABEL_SCHEMA = pa.schema([("problem_id", pa.string()), ("norm_hash", pa.string()), ("exact_of", pa.string()),
                          ("near_of", pa.string()), ("jaccard", pa.float64()), ("representative", pa.bool_())])


def label_duplicates(con: duckdb.DuckDBPyConnection, *, threshold: float = 0.8, num_perm: int = 128,
                     shingle: int = 5) -> int:
    """Label the problems not in `dup_problems` yet (see the module docstring); returns how many."""
    if not 0 < threshold <= 1 or num_perm < 2 or shingle < 1:
        raise ValueError(f"dedup: threshold {threshold} must be in (0, 1], num_perm {num_perm} >= 2, "
                         f"shingle {shingle} >= 1")
    con.execute(DUP_PROBLEMS)
    con.execute(DUP_SIGNATURES)
    ids, hashes, lengths, words = _tokenized(con, """SELECT problem_id, min(coalesce(prompt, '')) AS prompt
        FROM problems WHERE problem_id NOT IN (SELECT problem_id FROM dup_problems) GROUP BY problem_id""")
    if not ids:
        return 0
    minhash = f"{MINHASH_VERSION} duckdb={duckdb.__version__} perm={num_perm} shingle={shingle}"
    # --- exact: normalized-text hash; a hash an earlier run saw points to that run's head ----------------
    old_heads = _old_heads(con, set(hashes))
    labels, heads = _exact_groups(ids, hashes, old_heads)
    # --- near: MinHash signatures of the new group heads, LSH bands against old representatives --------
    head_rows = np.array([i for i, pid in enumerate(ids) if pid in heads], dtype=np.int64)
    perms = _permutations(num_perm)
    head_sigs = signatures(*_select(lengths, words, head_rows), perms, shingle)
    old_ids, old_sigs = _old_representatives(con, minhash, perms, shingle)
    near = _near_duplicates([ids[i] for i in head_rows], head_sigs, old_ids, old_sigs, threshold, num_perm)
    # --- clusters: members of a head's exact group follow the head to its representative ----------------
    for pid, label in labels.items():
        head = label["exact_of"] or pid
        if head in near:
            label["near_of"], jaccard = near[head]
            label["jaccard"] = label["jaccard"] or jaccard
        label["representative"] = label["exact_of"] is None and label["near_of"] is None
    _write(con, labels, ids, head_rows, head_sigs, minhash)
    log.info("duplicates: %d problems labeled, %d exact and %d near duplicates", len(labels),
             sum(1 for v in labels.values() if v["exact_of"]),
             sum(1 for v in labels.values() if v["near_of"] and not v["exact_of"]))
    return len(labels)


def _tokenized(con, rows_sql: str, params=None) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """For the rows (problem_id, prompt) of a query, in id order: ids, normalized-text hashes, word counts and
    the words' 64-bit hashes (DuckDB's hash(), all problems' words in one flat array)."""
    with word_function(con):
        table = con.sql(f"""
            SELECT problem_id, md5(array_to_string(w, ' '))[:16] AS norm_hash, list_transform(w, lambda x: hash(x)) AS words
            FROM (SELECT problem_id, {words_sql('prompt')} AS w FROM ({rows_sql}))
            ORDER BY problem_id""", params=params).to_arrow_table()
    words = table["words"].combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.uint64()))
    lengths = np.diff(words.offsets.to_numpy()).astype(np.int64)
    return (table["problem_id"].to_pylist(), table["norm_hash"].to_pylist(), lengths,
            words.flatten().to_numpy().astype(np.uint64))


def _select(lengths: np.ndarray, words: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The word counts and flat word hashes of some rows only."""
    starts = np.concatenate([[0], np.cumsum(lengths)])[rows]
    picked = lengths[rows]
    index = np.repeat(starts - np.concatenate([[0], np.cumsum(picked)[:-1]]), picked) + np.arange(picked.sum())
    return picked, words[index]


# ----------------------------------------------------------------------------- exact duplicates


def _old_heads(con, hashes: set[str]) -> dict[str, tuple[str, str | None]]:
    """norm_hash -> (head, its near_of) for the hashes an earlier run labeled."""
    con.register("_dup_hashes", pa.table({"norm_hash": sorted(hashes)}))
    try:
        rows = con.execute("""SELECT d.norm_hash, d.problem_id, d.near_of FROM dup_problems d
            JOIN _dup_hashes h USING (norm_hash) WHERE d.exact_of IS NULL""").fetchall()
    finally:
        con.unregister("_dup_hashes")
    return {h: (pid, near_of) for h, pid, near_of in sorted(rows, reverse=True)}  # several: the smallest id


def _exact_groups(ids, hashes, old_heads):
    """Labels of the new problems (exact part) and the new group heads, which still need the near check."""
    labels, heads, first = {}, set(), {}
    for pid, h in zip(ids, hashes, strict=True):  # ids are sorted: the first of a hash is the head
        label = {"norm_hash": h, "exact_of": None, "near_of": None, "jaccard": None}
        if h in old_heads:
            label["exact_of"], label["near_of"] = old_heads[h]
            label["jaccard"] = 1.0
        elif h in first:
            label["exact_of"], label["jaccard"] = first[h], 1.0
        else:
            first[h] = pid
            heads.add(pid)
        labels[pid] = label
    return labels, heads


# ----------------------------------------------------------------------------- MinHash


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-shift hash functions h -> (a*h + b) >> 32 (mod 2^64), a odd; fixed seed so signatures persist."""
    rng = np.random.Generator(np.random.PCG64(1))
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def _odd_multipliers(n: int) -> np.ndarray:
    """Fixed odd 64-bit multipliers: one per word of a shingle, one per row of an LSH band."""
    return np.random.Generator(np.random.PCG64(2)).integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + \
        np.uint64(1)


def signatures(lengths: np.ndarray, words: np.ndarray, perms: tuple[np.ndarray, np.ndarray],
               shingle: int) -> np.ndarray:
    """MinHash signatures (len(lengths) x num_perm, uint32) of the problems' word shingle sets; `words` holds
    every problem's word hashes one after the other, `lengths` how many each has."""
    a, b = perms
    out = np.empty((len(lengths), len(a)), dtype=np.uint32)
    word_start = np.concatenate([[0], np.cumsum(lengths)])
    shingles = np.cumsum(np.maximum(1, lengths - shingle + 1))
    start = 0
    while start < len(lengths):  # chunks of about _CHUNK_SHINGLES shingles (at least one problem)
        done = shingles[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(shingles, done + _CHUNK_SHINGLES)))
        hashes, owners = _shingle_hashes(lengths[start:stop], words[word_start[start]:word_start[stop]], shingle)
        with np.errstate(over="ignore"):  # (perm x shingle) layout: the min runs along contiguous memory
            permuted = ((a[:, None] * hashes[None, :] + b[:, None]) >> np.uint64(32)).astype(np.uint32)
        out[start:stop] = np.minimum.reduceat(permuted, owners, axis=1).T
        start = stop
    return out


def _shingle_hashes(lengths: np.ndarray, words: np.ndarray, shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every problem's shingles (a short problem: one shingle of all its words), and the
    index where each problem's shingles start."""
    word_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counts = np.maximum(1, lengths - shingle + 1)  # shingles per problem
    owner_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # position of every shingle's first word; a short problem's one shingle covers min(len, shingle) words
    first = np.repeat(word_start, counts) + (np.arange(counts.sum()) - np.repeat(owner_start, counts))
    width = np.repeat(np.minimum(lengths, shingle), counts)
    padded = np.concatenate([words, np.zeros(shingle, dtype=np.uint64)])
    hashes = np.zeros(len(first), dtype=np.uint64)
    mix = _odd_multipliers(shingle)
    with np.errstate(over="ignore"):
        for k in range(shingle):
            hashes += np.where(k < width, padded[first + k] + np.uint64(1), np.uint64(0)) * mix[k]
        hashes ^= hashes >> np.uint64(29)  # mix the high bits down: the permutations keep the high half
        hashes *= np.uint64(0xBF58476D1CE4E5B9)
        hashes ^= hashes >> np.uint64(32)
    return hashes, owner_start.astype(np.int64)


# ----------------------------------------------------------------------------- LSH


def _old_representatives(con, minhash: str, perms, shingle: int) -> tuple[list[str], np.ndarray]:
    """Ids and signatures of the representatives of earlier runs; re-hashed if made with other settings."""
    stale = [pid for (pid,) in con.execute("""
        SELECT d.problem_id FROM dup_problems d LEFT JOIN dup_signatures s USING (problem_id)
        WHERE d.representative AND s.minhash IS DISTINCT FROM ? ORDER BY 1""", [minhash]).fetchall()]
    if stale:
        con.register("_dup_stale", pa.table({"problem_id": stale}))
        ids, _, lengths, words = _tokenized(con, """SELECT problem_id, min(coalesce(prompt, '')) AS prompt
            FROM problems JOIN _dup_stale USING (problem_id) GROUP BY problem_id""")
        con.unregister("_dup_stale")
        con.execute("DELETE FROM dup_signatures WHERE problem_id IN (SELECT unnest(?::VARCHAR[]))", [stale])
        _insert_signatures(con, ids, signatures(lengths, words, perms, shingle), minhash)
        log.info("duplicates: re-hashed %d earlier representatives for %s", len(ids), minhash)
    table = con.sql("""SELECT s.problem_id, s.signature FROM dup_signatures s JOIN dup_problems d
        USING (problem_id) WHERE d.representative AND s.minhash = ? ORDER BY 1""", params=[minhash]).to_arrow_table()
    num_perm = len(perms[0])
    flat = table["signature"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table["problem_id"].to_pylist(), flat.astype(np.uint32).reshape(-1, num_perm)


def _near_duplicates(ids: list[str], sigs: np.ndarray, old_ids: list[str], old_sigs: np.ndarray,
                     threshold: float, num_perm: int) -> dict[str, tuple[str, float]]:
    """head -> (representative, estimated Jaccard) for the new heads that near-duplicate one.

    Greedy in id order over the new heads, against the old representatives and the new heads already found
    to be representatives; candidates are pairs sharing at least one LSH band."""
    from datasketch import MinHashLSH  # only for its choice of bands x rows for this threshold

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    all_sigs = np.concatenate([sigs, old_sigs]) if len(old_ids) else sigs
    n_new = len(ids)
    pairs = _candidate_pairs(all_sigs, n_new, lsh.b, lsh.r)
    if not len(pairs):
        return {}
    jaccard = (all_sigs[pairs[:, 0]] == all_sigs[pairs[:, 1]]).mean(axis=1)
    keep = jaccard >= threshold
    pairs, jaccard = pairs[keep], jaccard[keep]
    names = ids + old_ids
    by_head: dict[int, list[tuple[float, int]]] = {}
    for (i, j), jac in zip(pairs.tolist(), jaccard.tolist(), strict=True):
        by_head.setdefault(i, []).append((jac, j))
    near, is_rep = {}, np.ones(len(names), dtype=bool)
    for i in sorted(by_head):  # row order is id order
        matches = [(jac, j) for jac, j in by_head[i] if is_rep[j]]
        if matches:
            jac, j = min(matches, key=lambda m: (-m[0], names[m[1]]))
            near[names[i]] = (names[j], jac)
            is_rep[i] = False
    return near


def _candidate_pairs(sigs: np.ndarray, n_new: int, bands: int, rows: int) -> np.ndarray:
    """(i, j) row pairs sharing a band hash, i a new head, j an old representative or an earlier new head."""
    found = []
    mix = _odd_multipliers(rows)
    for band in range(bands):
        with np.errstate(over="ignore"):
            keys = (sigs[:, band * rows:(band + 1) * rows].astype(np.uint64) * mix).sum(axis=1, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            members = np.sort(order[start:start + size])
            new = members[members < n_new]
            for k, i in enumerate(new.tolist()):  # earlier new heads (smaller row) and every old one
                others = np.concatenate([new[:k], members[members >= n_new]])
                if len(others):
                    found.append(np.column_stack([np.full(len(others), i), others]))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


# ----------------------------------------------------------------------------- writing


def _write(con, labels: dict, ids: list[str], head_rows: np.ndarray, head_sigs: np.ndarray, minhash: str) -> None:
    rows = [{"problem_id": pid, **labels[pid]} for pid in ids]
    reps = [k for k, i in enumerate(head_rows) if labels[ids[i]]["representative"]]
    with transaction(con):
        con.register("_dup_new", pa.Table.from_pylist(rows, schema=LABEL_SCHEMA))
        con.execute("INSERT INTO dup_problems SELECT * FROM _dup_new")
        con.unregister("_dup_new")
        _insert_signatures(con, [ids[head_rows[k]] for k in reps], head_sigs[reps], minhash)


def _insert_signatures(con, ids: list[str], sigs: np.ndarray, minhash: str) -> None:
    num_perm = sigs.shape[1] if sigs.ndim == 2 else 0
    values = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint32()), num_perm)
    table = pa.table({"problem_id": pa.array(ids, pa.string()), "minhash": pa.array([minhash] * len(ids)),
                      "signature": values.cast(pa.list_(pa.uint32()))})
    con.register("_dup_sigs", table)
    con.execute("INSERT OR REPLACE INTO dup_signatures SELECT * FROM _dup_sigs")  # a relabel may leave old rows
    con.unregister("_dup_sigs")

"""filter: trace shards -> DuckDB curation database -> curated SFT dataset (see filter/main.py)."""

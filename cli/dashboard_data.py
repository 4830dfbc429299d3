"""What the dashboard reads and how: the analytics tables as Arrow, queried with DuckDB.

The tables come through `storage.run_table` and the `Store` (boto3 on S3), not through DuckDB's own
S3 reader: DuckDB's httpfs extension must be downloaded at run time, which an offline worker cannot
do, and the store already knows the credentials and endpoint. Arrow tables registered in DuckDB are
scanned in place, so the same queries run on a local folder and on a bucket.

The SQL is `queries.sql` next to this module (package data), parsed by `load_queries`; the docs
carry a copy of that file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import duckdb
import pandas as pd
import pyarrow as pa

from storage.manifest import read_manifest
from storage.run_layout import key_for_uri
from storage.run_table import read_run_category_table, read_run_table
from storage.store import LocalStore, Store, open_store

QUERIES_PATH = Path(__file__).with_name("queries.sql")
_NAME = re.compile(r"^-- name: ([a-z0-9_]+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"\$([a-z_][a-z0-9_]*)")


def load_queries(path: Path = QUERIES_PATH) -> dict[str, str]:
    """name -> SQL of every `-- name: <id>` block, in file order; duplicate names are an error."""
    text = path.read_text()
    marks = list(_NAME.finditer(text))
    queries: dict[str, str] = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        body = text[mark.end() : following.start() if following else len(text)].strip().rstrip(";").strip()
        if mark.group(1) in queries:
            raise ValueError(f"{path.name}: query {mark.group(1)!r} is defined twice")
        queries[mark.group(1)] = body
    return queries


def query_parameters(sql: str) -> set[str]:
    """The `$name` parameters a query expects."""
    return set(_PARAM.findall(sql))


@functools.cache
def queries() -> dict[str, str]:
    return load_queries()


def read_tables(store: Store) -> dict[str, pa.Table]:
    """The run table and the category table of every run in the store."""
    return {"runs": read_run_table(store), "run_categories": read_run_category_table(store)}


def connect(tables: dict[str, pa.Table], manifest: pd.DataFrame | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the tables (and one night's manifest) registered by name."""
    con = duckdb.connect()
    for name, table in tables.items():
        con.register(name, table)
    if manifest is not None:
        con.register("manifest", manifest)
    return con


def night_manifest(store: Store, run_id: str) -> pd.DataFrame:
    """One night's manifest rows (the dashboard never loads every night's)."""
    return read_manifest(store, run_id)


def run_query(con: duckdb.DuckDBPyConnection, name: str, **params: object) -> pd.DataFrame:
    """Run the named query with exactly the parameters it declares."""
    sql = queries()[name]
    needed = query_parameters(sql)
    if missing := needed - set(params):
        raise ValueError(f"query {name} needs {sorted(missing)}")
    return con.execute(sql, {k: params[k] for k in needed}).df()


@functools.lru_cache(maxsize=8)
def _bucket_store(bucket: str) -> Store:
    return open_store(f"s3://{bucket}")


def store_and_key(uri: str) -> tuple[Store, str]:
    """The store holding a manifest URI (file:// or s3://) and the key inside it."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        store = _bucket_store(parsed.netloc)
        return store, key_for_uri(store, uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        return LocalStore(path.parent), path.name
    raise ValueError(f"{uri}: not a file:// or s3:// URI")


def read_uri(uri: str) -> bytes:
    store, key = store_and_key(uri)
    return store.get_bytes(key)


def link_for(uri: str, expires_s: int = 24 * 3600) -> str:
    """A URL a browser can open: presigned for S3, the file URI for a local store."""
    if uri.startswith("s3://"):
        store, key = store_and_key(uri)
        return store.presigned_url(key, expires_s=expires_s)
    return uri

"""Where things live under a store root: exemplar pairs and the catalogue with its index.

```
exemplars/<category>/<pair_id>/before.<ext>    the retoucher's input
exemplars/<category>/<pair_id>/after.<ext>     the retoucher's result
catalogue/...                                  images to edit, any sub-folders
catalogue/index.parquet (or index.csv)         image_id, key, category, partition
```

Layout problems in exemplars (a missing half, a stray file) are returned as `LayoutProblem`s rather
than raised: one bad pair must not stop a category from being learned, but it must be reported.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from storage.images import MissingPairHalfError, PairSizeMismatchError, load_image
from storage.keys import InvalidKeyError, StoreError, validate_key
from storage.run_layout import RunLayoutError, item_keys
from storage.store import NotFoundError, Store

__all__ = [
    "CATALOGUE_INDEX_COLUMNS",
    "CATALOGUE_PREFIX",
    "EXEMPLARS_PREFIX",
    "IMAGE_EXTENSIONS",
    "CatalogueIndexError",
    "ExemplarPair",
    "LayoutProblem",
    "catalogue_index_problems",
    "list_categories",
    "list_exemplar_pairs",
    "load_pair",
    "read_catalogue_index",
    "stray_exemplar_keys",
    "write_catalogue_index",
]

EXEMPLARS_PREFIX = "exemplars/"
CATALOGUE_PREFIX = "catalogue/"
CATALOGUE_INDEX_PARQUET = "catalogue/index.parquet"
CATALOGUE_INDEX_CSV = "catalogue/index.csv"
CATALOGUE_INDEX_COLUMNS = ("image_id", "key", "category", "partition")
# Added by read_catalogue_index: '' for a usable row, else why the row's item cannot be edited.
INDEX_ERROR_COLUMN = "index_error"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
_HALVES = ("before", "after")


class CatalogueIndexError(StoreError):
    """The catalogue index is missing, unreadable, or has rows the pipeline cannot process."""


@dataclass(frozen=True)
class ExemplarPair:
    """One before/after pair, by key; images are loaded only when a step needs them."""

    category: str
    pair_id: str
    before_key: str
    after_key: str


@dataclass(frozen=True)
class LayoutProblem:
    """Something in the tree that does not fit the layout; `code` is stable for reports and tests."""

    key: str
    code: str
    reason: str


def list_categories(store: Store) -> list[str]:
    """Category names: the folders directly under `exemplars/` that contain at least one file.

    Only names that are valid key segments; the keys of any other are `stray_exemplar_keys`.
    """
    return sorted({key.split("/")[1] for key in store.list(EXEMPLARS_PREFIX)
                   if key.count("/") >= 2 and _is_segment(key.split("/")[1])})


def stray_exemplar_keys(store: Store) -> list[LayoutProblem]:
    """Keys under `exemplars/` that belong to no category: a file directly under it, or a key whose
    category part is not a valid name (S3 keeps `exemplars//x.jpg` and `exemplars/../x.jpg`)."""
    problems = []
    for key in store.list(EXEMPLARS_PREFIX):
        if key.count("/") < 2 or not _is_segment(key.split("/")[1]):
            problems.append(LayoutProblem(key, "unexpected_key", f"expected {EXEMPLARS_PREFIX}<category>/<pair_id>/"
                                                                 "before|after.<ext>"))
    return problems


def _is_segment(name: str) -> bool:
    try:
        _validate_segment(name)
    except InvalidKeyError:
        return False
    return True


def list_exemplar_pairs(store: Store, category: str) -> tuple[list[ExemplarPair], list[LayoutProblem]]:
    """Complete pairs of `category` sorted by pair_id, and every problem found on the way."""
    validate_key(category)
    if "/" in category:
        raise InvalidKeyError(category, "a category is one path segment")
    base = f"{EXEMPLARS_PREFIX}{category}/"
    halves: dict[str, dict[str, list[str]]] = defaultdict(lambda: {h: [] for h in _HALVES})
    problems: list[LayoutProblem] = []
    for key in store.list(base):
        parts = key[len(base) :].split("/")
        try:
            validate_key(key)  # S3 lists keys no store call accepts: `a//b`, `a/../b`
        except InvalidKeyError as exc:
            problems.append(LayoutProblem(key, "invalid_key", exc.reason))
            continue
        if len(parts) != 2:
            problems.append(
                LayoutProblem(key, "unexpected_key", f"expected {base}<pair_id>/before|after.<ext>")
            )
            continue
        pair_id, name = parts
        stem, dot, ext = name.rpartition(".")
        if not dot or stem.lower() not in _HALVES:
            problems.append(
                LayoutProblem(key, "unexpected_key", "only before.<ext> and after.<ext> belong here")
            )
            continue
        if f".{ext.lower()}" not in IMAGE_EXTENSIONS:
            problems.append(
                LayoutProblem(
                    key, "unsupported_extension", f"extension .{ext} is not one of {sorted(IMAGE_EXTENSIONS)}"
                )
            )
            continue
        halves[pair_id][stem.lower()].append(key)
    pairs: list[ExemplarPair] = []
    for pair_id in sorted(halves):
        found = halves[pair_id]
        bad = False
        for half in _HALVES:
            keys = found[half]
            if not keys:
                other = found[_HALVES[1 - _HALVES.index(half)]][0]
                problems.append(
                    LayoutProblem(
                        other, MissingPairHalfError.code, f"pair {category}/{pair_id} has no {half} image"
                    )
                )
                bad = True
            elif len(keys) > 1:
                problems.append(LayoutProblem(keys[0], "ambiguous_pair", f"several {half} images: {keys}"))
                bad = True
        if not bad:
            pairs.append(ExemplarPair(category, pair_id, found["before"][0], found["after"][0]))
    return pairs, problems


def load_pair(store: Store, pair: ExemplarPair) -> tuple[Image.Image, Image.Image]:
    """Decode both halves; they must have the same size (after EXIF rotation) to be a pair."""
    images = []
    for key in (pair.before_key, pair.after_key):
        try:
            images.append(load_image(store, key))
        except NotFoundError as exc:
            raise MissingPairHalfError(key, f"pair {pair.category}/{pair.pair_id}: {exc}") from exc
    before, after = images
    if before.size != after.size:
        raise PairSizeMismatchError(
            pair.after_key,
            f"pair {pair.category}/{pair.pair_id}: before is {before.size[0]}x{before.size[1]}, "
            f"after is {after.size[0]}x{after.size[1]}",
        )
    return before, after


def _validated_index(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Normalise types (all four columns are strings) and refuse rows the pipeline cannot use."""
    missing = [c for c in CATALOGUE_INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogueIndexError(f"{where}: missing columns {missing}; need {list(CATALOGUE_INDEX_COLUMNS)}")
    out = df.copy()
    for col in CATALOGUE_INDEX_COLUMNS:
        nulls = out[col].isna()
        if nulls.any():
            raise CatalogueIndexError(
                f"{where}: column {col!r} is empty in rows {list(out.index[nulls][:10])}"
            )
        out[col] = out[col].astype(str)
    dupes = out["image_id"][out["image_id"].duplicated()]
    if len(dupes):
        raise CatalogueIndexError(f"{where}: duplicate image_id values {sorted(set(dupes))[:10]}")
    # Category and partition name units of work and output folders: a bad one is a broken index.
    for col in ("category", "partition"):
        for value in out[col].unique():
            try:
                _validate_segment(value)
            except InvalidKeyError as exc:
                raise CatalogueIndexError(f"{where}: bad {col}: {exc}") from exc
    # A bad key or image id concerns one item: it is recorded on the row so that the item becomes an
    # error row in the manifest while the rest of the catalogue is edited.
    out[INDEX_ERROR_COLUMN] = [_row_problem(row.image_id, row.key, row.category, row.partition)
                               for row in out.itertuples()]
    return out.reset_index(drop=True)


def _validate_segment(value: str) -> None:
    validate_key(value)
    if "/" in value:
        raise InvalidKeyError(value, "must be a single path segment")


def _row_problem(image_id: str, key: str, category: str, partition: str) -> str:
    """'' for a usable row, else the reason it cannot be edited (for the item's error row).

    Besides its own key and id, every key the item will produce (output, published copy, manifest)
    is built here: a 300-character image id is fine as a value but not as a file name.
    """
    try:
        _validate_segment(image_id)
    except InvalidKeyError as exc:
        return f"bad image_id: {exc}"
    try:
        validate_key(key)
    except InvalidKeyError as exc:
        return f"bad key: {exc}"
    try:
        item_keys(category, partition, image_id)
    except (InvalidKeyError, RunLayoutError) as exc:
        return f"bad image_id: its output keys would be invalid: {exc}"
    return ""


def read_catalogue_index(store: Store) -> pd.DataFrame:
    """The catalogue index (Parquet preferred, CSV accepted), validated, all columns as strings."""
    key, df = _read_raw_index(store)
    return _validated_index(df, store.uri_for(key))


def _read_raw_index(store: Store) -> tuple[str, pd.DataFrame]:
    for key, reader in ((CATALOGUE_INDEX_PARQUET, pd.read_parquet), (CATALOGUE_INDEX_CSV, _read_csv)):
        try:
            data = store.get_bytes(key)
        except NotFoundError:
            continue
        try:
            return key, reader(io.BytesIO(data))
        except Exception as exc:  # pandas/pyarrow raise many types for a broken file
            raise CatalogueIndexError(f"{store.uri_for(key)}: unreadable: {exc}") from exc
    raise CatalogueIndexError(f"{store.uri}: no {CATALOGUE_INDEX_PARQUET} or {CATALOGUE_INDEX_CSV}")


def catalogue_index_problems(store: Store) -> tuple[pd.DataFrame, list[LayoutProblem]]:
    """Every problem of the catalogue index at once, each naming the rows as a reader finds them (CSV:
    file line numbers, the header being line 1; Parquet: 1-based row numbers), and the rows whose four
    fields are present (for the image checks). `read_catalogue_index` refuses the first table-level
    problem instead; this is for `retouch validate`."""
    key, df = _read_raw_index(store)
    where = store.uri_for(key)

    def rows(labels) -> str:
        numbers = [int(i) + 2 if key.endswith(".csv") else int(i) + 1 for i in labels]
        shown = ", ".join(map(str, numbers[:20])) + (f" (+{len(numbers) - 20} more)" if len(numbers) > 20 else "")
        return ("line " if key.endswith(".csv") else "row ") + shown

    missing = [c for c in CATALOGUE_INDEX_COLUMNS if c not in df.columns]
    if missing:
        return df.iloc[0:0], [LayoutProblem(where, "bad_catalogue_index",
                                            f"missing columns {missing}; need {list(CATALOGUE_INDEX_COLUMNS)}")]
    problems: list[LayoutProblem] = []
    complete = df[list(CATALOGUE_INDEX_COLUMNS)].notna().all(axis=1)
    for col in CATALOGUE_INDEX_COLUMNS:
        nulls = df[col].isna()
        if nulls.any():
            problems.append(LayoutProblem(where, "empty_index_cell", f"column {col!r} is empty in {rows(df.index[nulls])}"))
    usable = df[complete].astype({c: str for c in CATALOGUE_INDEX_COLUMNS})
    for image_id, group in usable.groupby("image_id", sort=True):
        if len(group) > 1:
            problems.append(LayoutProblem(where, "duplicate_image_id", f"{image_id!r} in {rows(group.index)}"))
    for col in ("category", "partition"):
        for value, group in usable.groupby(col, sort=True):
            try:
                _validate_segment(value)
            except InvalidKeyError as exc:
                problems.append(LayoutProblem(where, f"bad_{col}", f"{rows(group.index)}: {exc}"))
    for row in usable.itertuples():
        reason = _row_problem(row.image_id, row.key, row.category, row.partition)
        if reason:
            problems.append(LayoutProblem(where, "bad_index_row", f"{rows([row.Index])} ({row.image_id}): {reason}"))
    return usable, problems


def _read_csv(buf: io.BytesIO) -> pd.DataFrame:
    # Strings throughout: image ids like "000123" must keep their zeros.
    return pd.read_csv(buf, dtype=str, keep_default_na=False, na_values=[""])


def write_catalogue_index(store: Store, df: pd.DataFrame) -> str:
    """Validate and write `catalogue/index.parquet` in one PUT; returns the key.

    Writing refuses what reading tolerates: a row with a bad key or image id is an error here.
    """
    out = _validated_index(
        df.drop(columns=[INDEX_ERROR_COLUMN], errors="ignore"), store.uri_for(CATALOGUE_INDEX_PARQUET)
    )
    problems = out[out[INDEX_ERROR_COLUMN] != ""]
    if len(problems):
        first = problems.iloc[0]
        raise CatalogueIndexError(
            f"{store.uri_for(CATALOGUE_INDEX_PARQUET)}: {first.image_id}: {first.index_error}"
        )
    out = out.drop(columns=[INDEX_ERROR_COLUMN])
    buf = io.BytesIO()
    out.to_parquet(buf, index=False)
    store.put_bytes(CATALOGUE_INDEX_PARQUET, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return CATALOGUE_INDEX_PARQUET

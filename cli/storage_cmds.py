"""`retouch ls` and `retouch validate`: look at a store root before a run trips over it.

`validate` reports every problem at once (a missing half, a stray file, a bad index row, an image that
will not decode) and exits non-zero, so it can gate an upload script or a CI job.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import missing_reason
from storage.images import ImageError, load_image
from storage.keys import InvalidKeyError, validate_key
from storage.layout import (
    CATALOGUE_PREFIX,
    CatalogueIndexError,
    LayoutProblem,
    catalogue_index_problems,
    list_categories,
    list_exemplar_pairs,
    load_pair,
    stray_exemplar_keys,
)
from storage.store import open_store


def ls_command(
    uri: Annotated[str, typer.Argument(help="A folder, file:// URI or s3://bucket/prefix.")],
    prefix: Annotated[str, typer.Option(help="Only keys starting with this.")] = "",
    long: Annotated[bool, typer.Option("--long", "-l", help="Also print size and ETag.")] = False,
) -> None:
    """List the keys under a store root, sorted; nothing there is a warning and exit 1 (a typo, usually).

    Example: retouch ls s3://bucket/shop --prefix exemplars/ -l"""
    store = open_store(uri)
    listed = 0
    for info in store.list_objects(prefix):
        listed += 1
        typer.echo(f"{info.size:>12}  {info.etag:<34}  {info.key}" if long else info.key)
    if not listed:
        where = f"{uri} (prefix {prefix!r})" if prefix else uri
        typer.echo(f"warning: {missing_reason(store, where)}", err=True)
        raise typer.Exit(1)


def validate_command(
    root: Annotated[str, typer.Argument(help="The store root holding exemplars/ and catalogue/.")],
    decode: Annotated[
        bool,
        typer.Option(help="Also decode every exemplar and catalogue image (slower, catches broken files)."),
    ] = False,
) -> None:
    """Check a root against the exemplar/catalogue layout (see README) and print every problem at once,
    then what was found (categories, pairs, index rows, partitions).

    Example: retouch validate s3://bucket/shop --decode"""
    problems, found = _validate(root, decode)
    for p in problems:
        typer.echo(f"{p.code:<22} {p.key}: {p.reason}")
    typer.echo("found " + ", ".join(f"{n} {what}" for what, n in found.items()))
    typer.echo(f"{len(problems)} problem(s) in {root}")
    if problems:
        raise typer.Exit(1)


def _validate(root: str, decode: bool) -> tuple[list[LayoutProblem], dict[str, int]]:
    store = open_store(root)
    problems: list[LayoutProblem] = list(stray_exemplar_keys(store))
    categories = list_categories(store)
    found = {"categories": len(categories), "exemplar pairs": 0, "index rows": 0, "partitions": 0}
    if not categories:
        problems.append(
            LayoutProblem("exemplars/", "no_exemplars", "no exemplars/<category>/<pair_id>/ found")
        )
    for category in categories:
        pairs, category_problems = list_exemplar_pairs(store, category)
        found["exemplar pairs"] += len(pairs)
        problems.extend(category_problems)
        for pair in pairs if decode else ():
            try:
                load_pair(store, pair)
            except ImageError as exc:
                problems.append(LayoutProblem(exc.key, exc.code, exc.reason))
    try:
        index, index_problems = catalogue_index_problems(store)
    except CatalogueIndexError as exc:
        problems.append(LayoutProblem(CATALOGUE_PREFIX, "bad_catalogue_index", str(exc)))
        return problems, found
    problems.extend(index_problems)
    found["index rows"], found["partitions"] = len(index), index["partition"].nunique() if len(index) else 0
    unknown = sorted(set(index["category"]) - set(categories)) if len(index) else []
    if unknown:
        problems.append(
            LayoutProblem(
                CATALOGUE_PREFIX, "unknown_category", f"index categories without exemplars: {unknown}"
            )
        )
    present = set(store.list(CATALOGUE_PREFIX))
    for key in index["key"] if len(index) else ():
        try:
            validate_key(key)
        except InvalidKeyError:
            continue  # reported as a bad index row
        # One listing answers for keys under catalogue/; keys elsewhere cost a request each.
        missing = key not in present if key.startswith(CATALOGUE_PREFIX) else not store.exists(key)
        if missing:
            problems.append(LayoutProblem(key, "missing_image", "listed in the catalogue index but absent"))
        elif decode:
            try:
                load_image(store, key)
            except ImageError as exc:
                problems.append(LayoutProblem(exc.key, exc.code, exc.reason))
    return problems, found


def register(app: typer.Typer) -> None:
    app.command("ls")(ls_command)
    app.command("validate")(validate_command)

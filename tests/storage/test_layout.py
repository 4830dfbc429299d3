"""Layouts: the README's example tree is built for real and read back through storage/layout.py."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage.layout import (
    CatalogueIndexError,
    ExemplarPair,
    list_categories,
    list_exemplar_pairs,
    load_pair,
    read_catalogue_index,
    stray_exemplar_keys,
    write_catalogue_index,
)
from storage.manifest import manifest_row, read_manifest, write_manifest_partition

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- marker -->` in the README."""
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def _tree_files(tree: str) -> list[str]:
    """Parse a `tree`-style drawing (4 characters per level) into file keys relative to its root."""
    lines = tree.strip("\n").splitlines()[1:]  # the first line is the root folder itself
    stack: list[str] = []
    files = []
    for line in lines:
        name = re.sub(r"^[│ ├└─\u00a0]*", "", line).strip()
        depth = (len(line) - len(line.lstrip("│ ├└─"))) // 4 - 1
        stack[depth:] = [name.rstrip("/")]
        if not name.endswith("/"):
            files.append("/".join(stack))
    return files


def _image(fmt: str, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, format=fmt
    )
    return buf.getvalue()


def _build_readme_tree(store) -> list[str]:
    files = _tree_files(_readme_block("layout-example"))
    for key in files:
        ext = key.rsplit(".", 1)[-1]
        if key == "catalogue/index.csv":
            store.put_bytes(key, _readme_block("catalogue-index-example").encode())
        elif key.startswith("manifest/"):
            run_id = key.split("/")[1].removeprefix("run=")
            partition = key.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
            row = manifest_row(
                run_id=run_id,
                image_id="sku-1001",
                category="warm-studio",
                partition=partition,
                method="instructbrush",
            )
            assert write_manifest_partition(store, run_id, partition, [row]) == key
        else:
            store.put_bytes(key, _image({"jpg": "JPEG", "png": "PNG"}[ext]))
    return files


def test_readme_tree_parses_to_the_documented_keys():
    files = _tree_files(_readme_block("layout-example"))
    assert "exemplars/warm-studio/pair-001/before.jpg" in files
    assert "catalogue/index.csv" in files
    assert "manifest/run=2026-11-21/part-p000.parquet" in files
    assert len(files) == 11


def test_readme_layout_example_is_real(store):
    files = _build_readme_tree(store)
    assert list(store.list()) == sorted(files)
    assert list_categories(store) == ["soft-matte", "warm-studio"]
    pairs, problems = list_exemplar_pairs(store, "warm-studio")
    assert problems == []
    assert pairs == [
        ExemplarPair(
            "warm-studio",
            "pair-001",
            "exemplars/warm-studio/pair-001/before.jpg",
            "exemplars/warm-studio/pair-001/after.jpg",
        ),
        ExemplarPair(
            "warm-studio",
            "pair-002",
            "exemplars/warm-studio/pair-002/before.png",
            "exemplars/warm-studio/pair-002/after.png",
        ),
    ]
    before, after = load_pair(store, pairs[1])
    assert before.size == after.size == (24, 16)
    index = read_catalogue_index(store)
    assert index.to_dict("list") == {
        "image_id": ["sku-1001", "sku-1002", "sku-2001"],
        "key": [
            "catalogue/shoes/sku-1001.jpg",
            "catalogue/shoes/sku-1002.jpg",
            "catalogue/bags/sku-2001.png",
        ],
        "category": ["warm-studio", "warm-studio", "soft-matte"],
        "partition": ["p000", "p000", "p001"],
        "index_error": ["", "", ""],
    }
    assert all(store.exists(key) for key in index["key"])
    assert read_manifest(store, "2026-11-21")["image_id"].tolist() == ["sku-1001"]


def test_exemplar_problems_are_reported_not_raised(store):
    png = _image("PNG")
    for key in [
        "exemplars/c/ok/before.png",
        "exemplars/c/ok/after.png",
        "exemplars/c/stray.txt",
        "exemplars/c/notes/readme.md",
        "exemplars/c/twice/before.png",
        "exemplars/c/twice/before.jpg",
        "exemplars/c/twice/after.png",
        "exemplars/c/raw/before.cr2",
        "exemplars/c/raw/after.png",
        "exemplars/c/deep/x/before.png",
    ]:
        store.put_bytes(key, png)
    pairs, problems = list_exemplar_pairs(store, "c")
    assert [p.pair_id for p in pairs] == ["ok"]
    assert sorted((p.code, p.key) for p in problems) == [
        ("ambiguous_pair", "exemplars/c/twice/before.jpg"),
        ("missing_pair_half", "exemplars/c/raw/after.png"),
        ("unexpected_key", "exemplars/c/deep/x/before.png"),
        ("unexpected_key", "exemplars/c/notes/readme.md"),
        ("unexpected_key", "exemplars/c/stray.txt"),
        ("unsupported_extension", "exemplars/c/raw/before.cr2"),
    ]


def test_catalogue_index_parquet_round_trip_keeps_ids_as_strings(store):
    df = pd.DataFrame(
        {
            "image_id": ["007", "008"],
            "key": ["catalogue/a.jpg", "catalogue/b.jpg"],
            "category": ["c", "c"],
            "partition": [0, 1],
        }
    )
    assert write_catalogue_index(store, df) == "catalogue/index.parquet"
    back = read_catalogue_index(store)
    assert back["image_id"].tolist() == ["007", "008"]
    assert back["partition"].tolist() == ["0", "1"]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("image_id,key,category\n1,catalogue/a.jpg,c\n", "missing columns \\['partition'\\]"),
        (
            "image_id,key,category,partition\n1,catalogue/a.jpg,c,p0\n1,catalogue/b.jpg,c,p0\n",
            "duplicate image_id",
        ),
        ("image_id,key,category,partition\n1,catalogue/a.jpg,,p0\n", "column 'category' is empty"),
        ("image_id,key,category,partition\n1,catalogue/a.jpg,c,p/0\n", "bad partition"),
    ],
)
def test_bad_catalogue_index_is_refused(store, csv, message):
    store.put_bytes("catalogue/index.csv", csv.encode())
    with pytest.raises(CatalogueIndexError, match=message):
        read_catalogue_index(store)


def test_path_like_key_marks_its_row_and_keeps_the_rest(store):
    csv = (
        "image_id,key,category,partition\n"
        "1,catalogue/a.jpg,c,p0\n2,../../etc/passwd,c,p0\n3,/abs.jpg,c,p0\nx/y,catalogue/b.jpg,c,p0\n"
    )
    store.put_bytes("catalogue/index.csv", csv.encode())
    index = read_catalogue_index(store)
    assert index["image_id"].tolist() == ["1", "2", "3", "x/y"]
    problems = index["index_error"].tolist()
    assert problems[0] == ""
    assert problems[1].startswith("bad key") and ".." in problems[1]
    assert problems[2].startswith("bad key")
    assert problems[3].startswith("bad image_id")


def test_writing_an_index_with_a_bad_key_is_refused(store):
    df = pd.DataFrame([{"image_id": "1", "key": "../a.jpg", "category": "c", "partition": "p0"}])
    with pytest.raises(CatalogueIndexError, match="bad key"):
        write_catalogue_index(store, df)


def test_missing_catalogue_index_is_a_clear_error(store):
    with pytest.raises(CatalogueIndexError, match="no catalogue/index.parquet or catalogue/index.csv"):
        read_catalogue_index(store)


def test_item_whose_output_keys_cannot_exist_becomes_its_own_error_row(store):
    # 252 characters is a valid id, but "<id>.png" is a 256-byte file name: no local disk holds it.
    long_id = "x" * 252
    csv = f"image_id,key,category,partition\nok,catalogue/a.jpg,c,p0\n{long_id},catalogue/b.jpg,c,p0\n"
    store.put_bytes("catalogue/index.csv", csv.encode())
    index = read_catalogue_index(store).set_index("image_id")
    assert index.loc["ok", "index_error"] == ""
    assert "output keys would be invalid" in index.loc[long_id, "index_error"]
    assert "longer than 255 bytes" in index.loc[long_id, "index_error"]


class _ListingStore:
    """Only what exemplar listing needs, over keys S3 keeps but no store call accepts (`//`, `..`)."""

    uri = "memory://"

    def __init__(self, keys):
        self.keys = sorted(keys)

    def list(self, prefix=""):
        return iter([k for k in self.keys if k.startswith(prefix)])


def test_malformed_exemplar_keys_become_reported_problems_not_crashes():
    store = _ListingStore([
        "exemplars//x.jpg",
        "exemplars/warm/../before.png",
        "exemplars/warm/../after.png",
        "exemplars/warm/p1/before.png",
        "exemplars/warm/p1/after.png",
        "exemplars/warm//p2/after.png",
    ])
    assert list_categories(store) == ["warm"]
    assert [(p.key, p.code) for p in stray_exemplar_keys(store)] == [("exemplars//x.jpg", "unexpected_key")]
    pairs, problems = list_exemplar_pairs(store, "warm")
    assert [p.pair_id for p in pairs] == ["p1"]
    assert sorted((p.key, p.code) for p in problems) == [
        ("exemplars/warm/../after.png", "invalid_key"),
        ("exemplars/warm/../before.png", "invalid_key"),
        ("exemplars/warm//p2/after.png", "invalid_key"),
    ]

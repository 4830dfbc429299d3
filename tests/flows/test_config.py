"""The refresh config as users write it (YAML for `retouch refresh`) and the instruction cache key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.refresh import load_refresh_config
from tasks.learn import instruction_cache_key
from tasks.params import LearnParams, RefreshConfig


def test_yaml_config_fills_defaults_and_nested_models(tmp_path: Path):
    path = tmp_path / "refresh.yaml"
    path.write_text("store_uri: s3://shop/retouch\nlearn:\n  steps: 10\nreview:\n  policy: auto_approve_passing\n")
    config = load_refresh_config(path)
    assert config.learn.steps == 10 and config.learn.space == "attention"
    assert config.review.policy == "auto_approve_passing"
    assert config.output_uri == "s3://shop/retouch"


def test_unknown_or_out_of_range_fields_are_refused(tmp_path: Path):
    with pytest.raises(ValidationError, match="stpes"):
        RefreshConfig.model_validate({"store_uri": "x", "learn": {"stpes": 3}})
    with pytest.raises(ValidationError, match="less than or equal"):
        RefreshConfig.model_validate({"store_uri": "x", "qc": {"flag_ssim_structure": 2}})


def test_run_id_must_be_a_key_segment():
    with pytest.raises(ValidationError):
        RefreshConfig(store_uri="x", run_id="a/b")


def test_cache_key_ignores_pair_order_and_min_pairs_but_not_what_shapes_the_result():
    learn = LearnParams()
    key = instruction_cache_key(["a", "b"], "model", learn.cache_fields())
    assert key == instruction_cache_key(["b", "a"], "model", learn.cache_fields())
    assert key == instruction_cache_key(["a", "b"], "model", LearnParams(min_pairs=5).cache_fields())
    assert key != instruction_cache_key(["a", "c"], "model", learn.cache_fields())
    assert key != instruction_cache_key(["a", "b"], "other-model", learn.cache_fields())
    assert key != instruction_cache_key(["a", "b"], "model", LearnParams(steps=61).cache_fields())


def test_config_schema_documents_every_field_for_the_ui_form():
    schema = RefreshConfig.model_json_schema()
    undocumented = [name for name, field in schema["properties"].items()
                    if "description" not in field and "$ref" not in field and "allOf" not in field]
    assert undocumented == []


@pytest.mark.parametrize("store_uri", ["", "   "])
def test_a_store_uri_must_name_a_store_not_the_workers_working_directory(store_uri):
    with pytest.raises(ValidationError, match="store_uri"):
        RefreshConfig(store_uri=store_uri)


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"fail_ssim_structure": 0.7, "flag_ssim_structure": 0.6}, "fail_ssim_structure"),
        ({"flag_clipped_fraction": 0.6, "fail_clipped_fraction": 0.5}, "flag_clipped_fraction"),
        ({"flag_strength_min": 5.0, "flag_strength_max": 3.0}, "flag_strength_min"),
    ],
)
def test_qc_thresholds_that_contradict_each_other_are_refused_when_the_config_is_read(qc, message):
    with pytest.raises(ValidationError, match=message):
        RefreshConfig.model_validate({"store_uri": "x", "qc": qc})


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_guidance_is_refused_by_the_method_config_too(value):
    from editing.instruct import ApplyConfig

    with pytest.raises(ValidationError):
        ApplyConfig(guidance_scale=value)
    with pytest.raises(ValidationError):
        RefreshConfig.model_validate({"store_uri": "x", "apply": {"guidance_scale": value}})

"""deployments/k8s/base-job-template.json against prefect-kubernetes' own template schema.

The template is checked the way Prefect uses it, without a cluster or a server:
- `prefect work-pool create --base-job-template` (the server's checks): `variables` is a valid JSON
  schema, its defaults validate against it, and every `{{ placeholder }}` of `job_configuration` is a
  declared variable;
- the Kubernetes worker: `KubernetesWorkerJobConfiguration.from_template_and_values()` and
  `prepare_for_flow_run()` build the Job the worker would submit, which must be a valid `batch/v1`
  Job (every field known to the Kubernetes API models that prefect-kubernetes ships, every required
  field present) whose container requests the GPU, mounts the model cache volume and takes the store
  credentials and the signing key from secrets.

prefect-kubernetes is in the `test` extra: if it is missing, this module fails to import (no skip).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import jsonschema
import pytest
import yaml
from kubernetes_asyncio.client import models as k8s_models
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import PlaceholderType, find_placeholders
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from storage.model_cache import default_cache_dir

K8S = Path(__file__).resolve().parents[2] / "deployments" / "k8s"
TEMPLATE_PATH = K8S / "base-job-template.json"
PVC_PATH = K8S / "model-cache-pvc.yaml"
IMAGE = "registry.invalid/catalogue-retouch:test"


def load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE_PATH.read_text())


def defaults(template: dict[str, Any]) -> dict[str, Any]:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def check_placeholders(template: dict[str, Any]) -> None:
    """What `prefect work-pool create` checks, plus the same for every placeholder in the defaults."""
    validate_base_job_template(template)  # the server's own check; raises ValueError
    declared = set(template["variables"]["properties"])
    used = find_placeholders(json.dumps(template["job_configuration"]))
    undeclared = {p.name for p in used if p.type is PlaceholderType.STANDARD} - declared
    if undeclared:
        raise ValueError(f"undeclared variables in job_configuration: {sorted(undeclared)}")
    if any(p.type is not PlaceholderType.STANDARD for p in used):
        raise ValueError("job_configuration may only use the pool's own variables")
    # Defaults may point at a Prefect variable (the image), nothing else.
    for name, value in defaults(template).items():
        for p in find_placeholders(json.dumps(value)):
            if p.type is not PlaceholderType.VARIABLE:
                raise ValueError(f"default of {name} uses {p.full_match}")


def check_defaults(template: dict[str, Any], values: dict[str, Any] | None = None) -> None:
    """The server's validation of a pool's defaults (and of a deployment's job variables on top)."""
    schema = template["variables"]
    is_valid_schema(schema, preprocess=False)
    validate({**defaults(template), **(values or {})}, schema, raise_on_error=True, preprocess=True,
             ignore_required=True, allow_none_with_default=True)


# ---- the Kubernetes API types, from the models that prefect-kubernetes' client ships ----

_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}


def k8s_object(data: Any, type_name: str, path: str = "$", quantity: bool = False) -> Any:
    """`data` built as the Kubernetes type `type_name`: unknown fields, wrong shapes and missing
    required fields raise. Quantities (resource limits and requests) may be JSON numbers."""
    if type_name == "object":
        return data
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(data, list):
            raise TypeError(f"{path}: expected a list, got {data!r}")
        return [k8s_object(item, m[1], f"{path}[{i}]", quantity) for i, item in enumerate(data)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a mapping, got {data!r}")
        return {k: k8s_object(v, m[1], f"{path}.{k}", quantity) for k, v in data.items()}
    if type_name in _PRIMITIVES:
        allowed = (str, int, float) if quantity and type_name == "str" else _PRIMITIVES[type_name]
        if not isinstance(data, allowed) or (type_name == "int" and isinstance(data, bool)):
            raise TypeError(f"{path}: expected {type_name}, got {data!r}")
        return data
    cls = getattr(k8s_models, type_name)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a {type_name} mapping, got {data!r}")
    by_json_name = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json_name))
    if unknown:
        raise ValueError(f"{path}: {type_name} has no field(s) {unknown}")
    kwargs = {
        by_json_name[key]: k8s_object(value, cls.openapi_types[by_json_name[key]], f"{path}.{key}",
                                      quantity=type_name == "V1ResourceRequirements")
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a required field is missing, or an enum value is wrong
        raise ValueError(f"{path}: {exc}") from exc


def check_job(manifest: dict[str, Any]) -> None:
    """`manifest` is a valid batch/v1 Job, but for two fields the worker itself insists on.

    prefect-kubernetes requires `parallelism: 1` and `completions: 1` in the pod spec (its validator
    refuses a template without them) although they are Job spec fields; the API server drops them
    with a warning, so they are set aside here and nothing else is.
    """
    manifest = copy.deepcopy(manifest)
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    k8s_object(manifest, "V1Job")


# ---- building the Job the worker would submit ----


class _Variables:
    """Stands in for the Prefect client in `from_template_and_values`: only Prefect variables are read."""

    def __init__(self, variables: dict[str, Any]):
        self.variables = variables
        self.read: list[str] = []

    async def read_variable_by_name(self, name: str):
        self.read.append(name)
        return SimpleNamespace(value=self.variables[name]) if name in self.variables else None


def job_manifest(template: dict[str, Any], values: dict[str, Any] | None = None,
                 variables: dict[str, Any] | None = None) -> dict[str, Any]:
    client = _Variables({"retouch_image": IMAGE} if variables is None else variables)

    async def build() -> KubernetesWorkerJobConfiguration:
        return await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, values or {}, client=client)

    config = asyncio.run(build())
    config.prepare_for_flow_run(FlowRun(id=uuid4(), name="brave-otter", flow_id=uuid4()))
    return config.job_manifest


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    [only] = manifest["spec"]["template"]["spec"]["containers"]
    return only


def env(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(manifest)["env"]}


# ---- the tests ----


def test_template_keeps_everything_of_prefect_kubernetes_default_template():
    template = load_template()
    default = KubernetesWorker.get_default_base_job_template()
    assert set(template) == {"job_configuration", "variables"}
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(template["job_configuration"]) <= set(KubernetesWorkerJobConfiguration.model_fields)


def test_variables_are_a_valid_schema_whose_defaults_validate():
    template = load_template()
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    check_defaults(template)
    check_defaults(template, {"gpu_count": 2, "namespace": "gpu-team", "tolerations": []})
    props = template["variables"]["properties"]
    assert props["gpu_count"]["default"] == 1
    assert props["backoff_limit"]["default"] == 0
    assert props["finished_job_ttl"]["default"] > 0
    for name in ("namespace", "service_account_name", "image", "model_cache_claim", "store_secret_name",
                 "signing_secret_name"):
        assert name in props


@pytest.mark.parametrize("values", [{"gpu_count": -1}, {"gpu_count": "two"}, {"backoff_limit": -1},
                                    {"node_selector": {"gpu": 1}}, {"model_cache_claim": 5}])
def test_the_schema_refuses_bad_job_variables(values):
    with pytest.raises(Exception, match="Validation failed|is not|less than"):
        check_defaults(load_template(), values)


def test_every_placeholder_is_a_declared_variable():
    check_placeholders(load_template())


def test_a_misspelled_variable_is_refused():
    text = TEMPLATE_PATH.read_text()
    assert text.count("{{ gpu_count }}") == 2
    misspelled = json.loads(text.replace("{{ gpu_count }}", "{{ gpu_cuont }}", 1))
    with pytest.raises(ValueError, match="gpu_cuont"):
        check_placeholders(misspelled)


def test_a_misspelled_manifest_field_is_refused():
    template = load_template()
    spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    spec["containers"][0]["volumeMount"] = spec["containers"][0].pop("volumeMounts")
    with pytest.raises(ValueError, match="V1Container has no field.*volumeMount"):
        check_job(job_manifest(template))


def test_the_worker_refuses_a_template_without_its_container():
    template = load_template()
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["name"] = "gpu"
    with pytest.raises(ValueError, match="incompatible values.*prefect-job"):
        job_manifest(template)


def test_the_job_requests_the_gpu_mounts_the_cache_and_reads_the_secrets(monkeypatch):
    manifest = job_manifest(load_template())
    check_job(manifest)
    pod = manifest["spec"]["template"]["spec"]
    c = container(manifest)

    assert manifest["metadata"]["namespace"] == "retouch"
    assert manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400
    assert c["image"] == IMAGE  # from the Prefect variable retouch_image
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "cpu" not in c["resources"]["limits"]  # unset variables drop out
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "serviceAccountName" not in pod  # the namespace's default account

    [volume] = pod["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": "retouch-model-cache"}
    [mount] = c["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/var/cache/catalogue-retouch"}

    variables = env(manifest)
    # The model cache the project's loading uses is on the volume.
    monkeypatch.setenv("RETOUCH_MODEL_CACHE", variables["RETOUCH_MODEL_CACHE"]["value"])
    assert default_cache_dir().is_relative_to(mount["mountPath"])
    assert Path(variables["PREFECT_LOCAL_STORAGE_PATH"]["value"]).is_relative_to(mount["mountPath"])
    assert variables["RETOUCH_SIGNING_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "retouch-signing-key", "key": "key", "optional": True}
    assert c["envFrom"] == [{"secretRef": {"name": "retouch-store", "optional": True}}]
    assert not any(name.startswith("AWS_") for name in variables)  # credentials only via the secret
    # The worker's own variables are still there, and with backoffLimit 0 an evicted pod's run is
    # rescheduled by Prefect.
    assert "PREFECT__FLOW_RUN_ID" in variables
    assert variables["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"


def test_job_variables_of_a_deployment_override_the_defaults():
    values = {"gpu_count": 2, "namespace": "gpu-team", "service_account_name": "retouch-runner",
              "model_cache_claim": "big-cache", "cache_mount_path": "/models", "store_secret_name": "s3-prod",
              "signing_secret_name": "review-key", "image": "registry.invalid/other:2",
              "node_selector": {"gpu-kind": "l4"}, "env": {"AWS_DEFAULT_REGION": "eu-central-1"}}
    template = load_template()
    check_defaults(template, values)
    manifest = job_manifest(template, values, variables={})
    check_job(manifest)
    pod = manifest["spec"]["template"]["spec"]
    c = container(manifest)
    variables = env(manifest)
    assert manifest["metadata"]["namespace"] == "gpu-team"
    assert pod["serviceAccountName"] == "retouch-runner"
    assert pod["nodeSelector"] == {"gpu-kind": "l4"}
    assert c["image"] == "registry.invalid/other:2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "big-cache"
    assert c["volumeMounts"][0]["mountPath"] == "/models"
    assert variables["RETOUCH_MODEL_CACHE"]["value"] == "/models/models"
    assert variables["RETOUCH_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "review-key"
    assert c["envFrom"][0]["secretRef"]["name"] == "s3-prod"
    assert variables["AWS_DEFAULT_REGION"]["value"] == "eu-central-1"


def test_the_model_cache_claim_matches_the_template():
    pvc = yaml.safe_load(PVC_PATH.read_text())
    k8s_object(pvc, "V1PersistentVolumeClaim")
    props = load_template()["variables"]["properties"]
    assert pvc["metadata"]["name"] == props["model_cache_claim"]["default"]
    assert pvc["metadata"]["namespace"] == props["namespace"]["default"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_checker_itself_catches_wrong_shapes():
    good = copy.deepcopy(yaml.safe_load(PVC_PATH.read_text()))
    good["spec"]["accessModes"] = "ReadWriteMany"
    with pytest.raises(TypeError, match="accessModes: expected a list"):
        k8s_object(good, "V1PersistentVolumeClaim")
    with pytest.raises(ValueError, match="must not be `None`"):
        k8s_object({"secretKeyRef": {"name": "retouch-signing-key"}}, "V1EnvVarSource")

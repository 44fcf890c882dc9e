"""Render the chart with Helm's own Go SDK and validate what it renders, all offline.

- Rendering and lint: `helm-python-sdk`, a ctypes binding to libhelm_c, which is built from
  Helm's official Go SDK (helm.sh/helm/v4) — the same template engine and linter as the `helm`
  CLI, without a binary to download.
- Built-in kinds: the Kubernetes OpenAPI schemas that `kubernetes-validate` ships, strict
  variant (unknown fields are errors, as `kubectl apply --validate=strict` makes them).
- LeaderWorkerSet and ExternalSecret: their CRDs' openAPIV3Schema, vendored under schemas/
  (provenance in each file's $comment), made strict the same way; LWS pod templates are checked
  against the core PodTemplate schema.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from helm_python import chart as helm_chart
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "bastion"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
NAMESPACE = "bank-llm"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schemas
# shipped: an API removed or added in between fails one of the two.
KUBE_VERSIONS = ("1.27.0", kv.latest_version())

CRDS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-v1.json",
    ("external-secrets.io/v1", "ExternalSecret"): "externalsecret-v1.json",
}


def values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text())


def render(vals: dict[str, Any], name: str = "bastion") -> list[dict[str, Any]]:
    """Every object the chart renders (what `helm template` prints), parsed."""
    chart = helm_chart.Chart.load(CHART)
    files = chart.render(vals, name=name, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def lint(vals: dict[str, Any]) -> dict[str, Any]:
    return helm_chart.lint(CHART, vals, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


@functools.cache
def _builtin_validator(version: str, api_version: str, kind: str) -> jsonschema.Validator:
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    group = api_version.split("/")[0].split(".")[0] if "/" in api_version else ""
    api = f"{group}-{api_version.split('/')[-1]}" if group else api_version
    schema = kv.schema_contents(f"{schema_dir}/{kind.lower()}-{api}.json", version)
    defs = kv.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry: Registry = Resource.from_contents(defs) @ (
        Resource.from_contents(schema) @ Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _strict(schema: Any) -> Any:
    """An apiserver prunes fields a CRD schema does not name; here they are errors instead."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(file: str) -> jsonschema.Validator:
    schema = json.loads((SCHEMAS / file).read_text())
    schema.pop("$comment", None)
    # Kubernetes fills metadata itself; its structure is checked by the apiserver, not the CRD.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(_strict(schema))


def errors(doc: dict[str, Any], version: str) -> list[str]:
    """Schema errors of one rendered object (empty: valid)."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    where = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
    if key in CRDS:
        validator = _crd_validator(CRDS[key])
        out = [f"{where}: {e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
        if key[1] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for part in ("leaderTemplate", "workerTemplate"):
                if part in lwt:
                    pod = {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": "x"},
                        "template": copy.deepcopy(lwt[part]),
                    }
                    out += [f"{where}.{part}: {m}" for m in errors(pod, version)]
        return out
    try:
        validator = _builtin_validator(version, *key)
    except FileNotFoundError:
        return [f"{where}: no Kubernetes {version} schema for {key[0]} {key[1]}"]
    return [f"{where}: {e.json_path}: {e.message}" for e in validator.iter_errors(doc)]

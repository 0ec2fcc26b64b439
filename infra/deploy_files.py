"""Reading vlmq's deployment files for `infra/validate.py`: YAML that refuses duplicate keys, paths named from ROOT."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

BATCH_TIMEOUT_S = 600.0  # VLMQ_BATCH_TIMEOUT_S's default


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
        raise Invalid(f"{rel_path(path, root)}: {exc}") from None


def rel_path(path: Path, root: Path) -> str:
    """`path` relative to the checkout when it is inside it, as given otherwise."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def dotted(parts: Iterable[Any]) -> str:
    """A JSON path as `a.b.0.c`, for a schema error's location."""
    return ".".join(str(p) for p in parts) or "(top level)"

"""Name -> implementation tables (methods, selection stages, codecs, datasets). YAML names entries.

The registry is a leaf: it imports no implementation. Entries are added by whoever defines them
(`@register_method` in a method file, `@register_selector` in a selection file) or by
`hetfl.builtins`, which imports every shipped module and registers what ships. The entry points
(`hetfl.cli`, `hetfl.runner`, `hetfl.sweep`, the Flower apps, tests/conftest.py) import
`hetfl.builtins`; a library user who imports neither gets a `RuntimeError` saying so on the
first lookup, never a misleading "unknown method".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from hetfl.errors import ConfigError

T = TypeVar("T")

BUILTINS = "hetfl.builtins"  # the module whose import registers the shipped entries


class Registry(Generic[T]):
    """A named table of entries; `get` of an unknown name is a user error naming the key.

    Reading a table (`get`, `names`, `in`) before `hetfl.builtins` is imported raises
    RuntimeError: the table would hold only what happens to be imported, so an answer such as
    "unknown method 'fedit'" would be wrong. Adding entries is allowed at any time.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, key: str | None = None) -> T:
        """The entry `name`.

        Raises:
            ConfigError: no entry of that name (the message names `key`, e.g. "method.name").
            RuntimeError: `hetfl.builtins` was never imported.
        """
        items = self._table()
        if name not in items:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r} (choose from: {', '.join(sorted(items))})")
        return items[name]

    def names(self) -> list[str]:
        return sorted(self._table())

    def __contains__(self, name: str) -> bool:
        return name in self._table()

    def _table(self) -> dict[str, T]:
        if BUILTINS not in sys.modules:
            raise RuntimeError(f"the {self.kind} table was read before the built-ins were registered: import "
                               f"{BUILTINS} first (hetfl.runner and hetfl.sweep import it; so does the CLI)")
        return self._items


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    factory: Callable[..., Any]  # factory(config, section config) -> Method or selection stage
    summary: str


METHODS: Registry[MethodSpec] = Registry("method")
# selection.name -> MethodSpec-like entry whose factory builds a data-selection stage
SELECTORS: Registry[MethodSpec] = Registry("selection stage")
# codec name (comm.up / comm.down) -> factory() -> codec (see comm/codecs.py)
CODECS: Registry[Callable[..., Any]] = Registry("codec")
# data.name -> builder(cfg) -> hetfl.tasks.base.TaskData (model + task + training samples + labels)
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")


def _registrar(table: Registry[MethodSpec], name: str, config_cls: type, summary: str) -> Callable[[T], T]:
    def deco(impl: T) -> T:
        table.add(name, MethodSpec(name, config_cls, impl, summary or (impl.__doc__ or "").strip().split("\n")[0]))
        return impl

    return deco


def register_method(name: str, config_cls: type, summary: str = "") -> Callable[[T], T]:
    """Class decorator: `@register_method("fedit", FedITConfig, "...")`; factory(cfg, method_cfg)."""
    return _registrar(METHODS, name, config_cls, summary)


def register_selector(name: str, config_cls: type, summary: str = "") -> Callable[[T], T]:
    """Class decorator for data-selection stages; factory(cfg, selection_cfg)."""
    return _registrar(SELECTORS, name, config_cls, summary)

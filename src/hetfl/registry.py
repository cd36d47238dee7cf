"""Small name -> implementation registries (methods, codecs). YAML refers to entries by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from hetfl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of entries; `get` of an unknown name is a user error naming the key."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, key: str | None = None) -> T:
        _load_builtins()
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r} (choose from: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._items


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    factory: Callable[..., Any]  # factory(config, scenario) -> Method
    summary: str


METHODS: Registry[MethodSpec] = Registry("method")
CODECS: Registry[Callable[..., Any]] = Registry("codec")
# selection.name -> MethodSpec-like entry whose factory builds a data-selection stage
SELECTORS: Registry[MethodSpec] = Registry("selection stage")
# data.name -> builder(cfg) -> hetfl.scenario.TaskData (model + task + training samples + labels)
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


_loaded = False


def _load_builtins() -> None:
    """Import the built-in method and codec modules once so that they register themselves."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import hetfl.comm.codecs  # noqa: F401
    import hetfl.methods  # noqa: F401
    import hetfl.selection  # noqa: F401
    import hetfl.tasks  # noqa: F401

"""Name -> factory registries for every pluggable component, and plugin discovery.

Components are found by name from recipes. ``ditx`` registers its own built-ins
(objectives, the identity autoencoder); everything modality-specific lives in
packages discovered through the ``ditx.plugins`` entry-point group, so a tokenizer
from a user's package is registered exactly like ours::

    # pyproject.toml of the user's package
    [project.entry-points."ditx.plugins"]
    my_tokenizers = "my_pkg.ditx_plugin"   # importing this module registers components
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "ditx.plugins"

_loaded_plugins: set[tuple[str, str]] = set()
_plugin_lock = threading.RLock()


class RegistryError(KeyError):
    """An unknown or duplicate component name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Maps names to factories (classes or functions) for one kind of component.

    ``builtins`` are modules of ``ditx`` imported on first lookup, so the core can
    register its own components without import cycles or import-time cost.
    """

    def __init__(self, kind: str, builtins: Iterable[str] = ()):
        self.kind = kind
        self._builtins = tuple(builtins)
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None, *, replace: bool = False):
        """Register ``factory`` under ``name``; usable as ``@registry.register("name")``.

        Registering a taken name raises unless ``replace=True``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(f: Callable[..., Any]):
            old = self._factories.get(name)
            if old is not None and old is not f and not replace:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {_qualname(old)}); "
                    f"pick another name or pass replace=True to override it"
                )
            self._factories[name] = f
            return f

        return add if factory is None else add(factory)

    def unregister(self, name: str) -> None:
        self._factories.pop(name, None)

    def _discover(self) -> None:
        for module in self._builtins:
            importlib.import_module(module)
        load_plugins()

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under ``name``; an unknown name lists the known ones."""
        if name not in self._factories:
            self._discover()
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "(none)"
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}. "
                f"Register new ones with ditx.registry.{self.kind}s.register(...) in a module "
                f"listed under the {PLUGIN_GROUP!r} entry-point group"
            ) from None

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Call the factory registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Sorted names of all registered components (after discovery)."""
        self._discover()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        if name not in self._factories:
            self._discover()
        return name in self._factories

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._factories)})"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def load_plugins() -> list[str]:
    """Import every module named in the ``ditx.plugins`` entry-point group, once each.

    Cheap to call repeatedly: entry points already imported are skipped, new ones
    (e.g. a distribution added to ``sys.path`` later) are picked up. Returns the names
    of the entry points imported by this call. A plugin that fails to import raises an
    error naming the entry point and its distribution.
    """
    imported = []
    with _plugin_lock:
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            key = (ep.name, ep.value)
            if key in _loaded_plugins:
                continue
            _loaded_plugins.add(key)
            try:
                ep.load()
            except Exception as e:
                _loaded_plugins.discard(key)
                dist = getattr(getattr(ep, "dist", None), "name", "?")
                raise ImportError(
                    f"ditx plugin {ep.name!r} = {ep.value!r} (distribution {dist!r}) failed to import: {e}"
                ) from e
            imported.append(ep.name)
            logger.debug("loaded ditx plugin %s = %s", ep.name, ep.value)
    return imported


tokenizers = Registry("tokenizer")
autoencoders = Registry("autoencoder", builtins=("ditx.autoencoder",))
datasets = Registry("dataset")
metrics = Registry("metric")
objectives = Registry("objective", builtins=("ditx.diffusion.objectives",))
# modality name -> function(samples, out_dir, labels=None) writing files a person can look at
writers = Registry("writer")

REGISTRIES: dict[str, Registry] = {
    "tokenizers": tokenizers,
    "autoencoders": autoencoders,
    "datasets": datasets,
    "metrics": metrics,
    "objectives": objectives,
    "writers": writers,
}

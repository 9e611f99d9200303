"""Name -> factory registries for every pluggable component, modalities, and plugin discovery.

Components are found by name from recipes. ``ditx`` registers its own built-ins
(objectives, the identity autoencoder); everything modality-specific lives in
packages discovered through the ``ditx.plugins`` entry-point group, so a tokenizer
from a user's package is registered exactly like ours::

    # pyproject.toml of the user's package
    [project.entry-points."ditx.plugins"]
    my_tokenizers = "my_pkg.ditx_plugin"   # importing this module registers components

A plugin whose components need optional packages declares them as a :class:`Modality`
and registers its components lazily, as ``"module:attribute"`` targets::

    video = declare_modality("video", requires={"decord": "decord"}, extra="video")
    video.register(tokenizers, "tubelet", "ditx.modalities.video.tokenizer:TubeletTokenizer")

Importing such a plugin needs nothing but ``ditx``; the modality's packages are checked,
and its module imported, only when one of its components is asked for, so a modality
whose packages are missing never breaks another one (:class:`MissingDependencyError`
names the modality, the packages and the ``pip install`` that brings them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "ditx.plugins"

_loaded_plugins: set[tuple[str, str]] = set()
_plugin_lock = threading.RLock()
# entry point "name = module" -> why it could not be imported (a package it needs is missing)
unavailable_plugins: dict[str, str] = {}


class RegistryError(KeyError):
    """An unknown or duplicate component name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingDependencyError(ImportError):
    """A component was asked for whose modality needs packages that are not installed."""


def package_missing(import_name: str) -> bool:
    """True if ``import name`` cannot be imported here (found without importing it)."""
    try:
        return importlib.util.find_spec(import_name) is None
    except (ImportError, ValueError):  # a parent that fails, or a module set to None in sys.modules
        return True


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Modality:
    """A group of components and the optional packages they need (one pip extra).

    ``requires`` maps import names to the distributions that provide them
    (``{"sklearn": "scikit-learn"}``); ``extra`` is the extra of ``distribution`` that
    installs them all. Declare with :func:`declare_modality`.
    """

    name: str
    requires: Mapping[str, str] = field(default_factory=dict)
    extra: str | None = None
    distribution: str = "ditx"

    def missing(self) -> list[str]:
        """Distributions this modality needs that cannot be imported here."""
        return sorted({dist for module, dist in self.requires.items() if package_missing(module)})

    def install_command(self, missing: Iterable[str] = ()) -> str:
        if self.extra:
            return f'pip install "{self.distribution}[{self.extra}]"'
        return "pip install " + " ".join(sorted(missing or set(self.requires.values())))

    def check(self, what: str = "") -> None:
        """Raise :class:`MissingDependencyError` if a package of this modality is missing."""
        missing = self.missing()
        if missing:
            raise self.error(missing, what)

    def error(self, missing: Iterable[str], what: str = "") -> MissingDependencyError:
        missing = sorted(missing)
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        whose = f"{what} is part of the {self.name!r} modality, which" if what else f"the {self.name!r} modality"
        return MissingDependencyError(
            f"{whose} needs {names} (not installed here); install with: {self.install_command(missing)}"
        )

    def register(self, registry: Registry, name: str, target: str, *, replace: bool = False) -> None:
        """Register ``target`` (``"package.module:attribute"``) under ``name``, imported on first use."""
        module, sep, attribute = target.partition(":")
        if not sep or not module or not attribute:
            raise ValueError(f"lazy component target must be 'module:attribute', got {target!r}")
        registry.register(name, LazyFactory(module, attribute, self), replace=replace)


@dataclass(frozen=True)
class LazyFactory:
    """A registered factory imported when first asked for, after its modality's packages are checked."""

    module: str
    attribute: str
    modality: Modality

    def points_to(self, obj: Any) -> bool:
        return getattr(obj, "__module__", None) == self.module and getattr(obj, "__qualname__", None) == self.attribute

    def __str__(self) -> str:
        return f"{self.module}:{self.attribute}"

    def resolve(self, what: str) -> Callable[..., Any]:
        self.modality.check(what)
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            top = (e.name or "").partition(".")[0]
            if top in self.modality.requires:  # a package missing that find_spec had not seen
                raise self.modality.error([self.modality.requires[top]], what) from e
            raise
        try:
            return getattr(module, self.attribute)
        except AttributeError:
            raise ImportError(
                f"{what} is registered as {self.module}:{self.attribute}, but {self.module} has no "
                f"{self.attribute!r}"
            ) from None


# modality name -> its declaration, as the plugins declare them (``ditx env`` lists them)
modalities: dict[str, Modality] = {}


def declare_modality(
    name: str, requires: Mapping[str, str] | None = None, extra: str | None = None, distribution: str = "ditx"
) -> Modality:
    """Declare (or, with the same packages again, look up) the modality ``name``."""
    modality = Modality(name, dict(requires or {}), extra, distribution)
    old = modalities.get(name)
    if old is not None and old != modality:
        raise RegistryError(f"modality {name!r} is already declared with other packages: {old}")
    modalities[name] = modality
    return modality


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
            if isinstance(old, LazyFactory) and old.points_to(f):
                old = None  # the object a lazy entry names, registered directly (an import of its module)
            if old is not None and old != f and not replace:
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
        """The factory registered under ``name``; an unknown name lists the known ones.

        A lazily registered factory is imported here, after its modality's packages are
        checked (:class:`MissingDependencyError` if one is missing).
        """
        if name not in self._factories:
            self._discover()
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "(none)"
            failed = "".join(f"; plugin {ep} could not be imported: {why}" for ep, why in unavailable_plugins.items())
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}. "
                f"Register new ones with ditx.registry.{self.kind}s.register(...) in a module "
                f"listed under the {PLUGIN_GROUP!r} entry-point group{failed}"
            ) from None
        if isinstance(factory, LazyFactory):
            factory = factory.resolve(f"{self.kind} {name!r}")
            self._factories[name] = factory
        return factory

    def name_of(self, factory: Callable[..., Any]) -> str | None:
        """The name ``factory`` is registered under (the first, if several), None when it is not."""
        self._discover()
        for name, registered in self._factories.items():
            if registered is factory or (isinstance(registered, LazyFactory) and registered.points_to(factory)):
                return name
        return None

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
    if isinstance(obj, LazyFactory):
        return str(obj)
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def load_plugins() -> list[str]:
    """Import every module named in the ``ditx.plugins`` entry-point group, once each.

    Cheap to call repeatedly: entry points already imported are skipped, new ones
    (e.g. a distribution added to ``sys.path`` later) are picked up. Returns the names
    of the entry points imported by this call.

    A plugin that fails to import raises an error naming the entry point and its
    distribution, with one exception: when what is missing is another package that the
    plugin imports (not the plugin's own module), the plugin is recorded in
    ``unavailable_plugins`` with a warning and the other plugins still load, so one
    plugin's missing dependency never breaks the rest.
    """
    imported = []
    with _plugin_lock:
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            key = (ep.name, ep.value)
            if key in _loaded_plugins:
                continue
            _loaded_plugins.add(key)
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            try:
                ep.load()
            except Exception as e:
                missing = (e.name or "").partition(".")[0] if isinstance(e, ModuleNotFoundError) else ""
                if missing and missing != ep.module.partition(".")[0]:  # a dependency, not the plugin
                    why = f"it needs {e.name!r}, which is not installed (distribution {dist!r})"
                    unavailable_plugins[f"{ep.name} = {ep.value}"] = why
                    logger.warning("ditx plugin %s = %s is unavailable: %s", ep.name, ep.value, why)
                    continue
                _loaded_plugins.discard(key)
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
text_encoders = Registry("text_encoder", builtins=("ditx.text",))
# modality name -> a ditx.writers.Writer: function(samples, out_dir, labels=None) -> written paths
writers = Registry("writer")
# modality name -> function(path, num_frames, size) -> (C, num_frames, size, size) in [-1, 1]: the frames
# a user gives to condition on (an image: one frame; a clip: its first num_frames), read and resized
readers = Registry("reader")

REGISTRIES: dict[str, Registry] = {
    "tokenizers": tokenizers,
    "autoencoders": autoencoders,
    "datasets": datasets,
    "metrics": metrics,
    "objectives": objectives,
    "text_encoders": text_encoders,
    "writers": writers,
    "readers": readers,
}

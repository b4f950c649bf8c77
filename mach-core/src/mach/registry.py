"""``REGISTRY`` of architectures, ``detect_arch`` (the one front door) and ``arch_summary``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import importlib_metadata

from mach import plugins
from mach.adapter import MoeArchAdapter
from mach.errors import AdapterError, UnknownArchitectureError

if TYPE_CHECKING:
    from mach.decode.speculative import Drafter
    from mach.io.load import LoadedModel

# Families that mach publishes, so an unknown model_type can name the package that adds it.
KNOWN_FAMILIES: dict[str, str] = {
    "qwen3_moe": "qwen",
    "qwen3_5_moe": "qwen",
    "qwen3_5_moe_text": "qwen",
    "gpt_oss": "gptoss",
    "gemma4": "gemma",
    "gemma4_text": "gemma",
    "deepseek_v4": "deepseek",
}

AdapterSpec = MoeArchAdapter | type[MoeArchAdapter] | str


META_DISTRIBUTION = "mach-moe"
"""The distribution whose extras pull families (``mach-moe[qwen]``); the import is ``mach``."""


def install_hint(family: str | None = None) -> str:
    """The pip command that installs a family's distribution (or every family)."""
    if family is None:
        return f'pip install "{META_DISTRIBUTION}[all]"'
    return f"pip install mach-adapter-{family}"


def load_object(path: str, what: str = "adapter") -> Any:
    """The object a plugin names lazily as ``"package.module:name"``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise AdapterError(f"{what} path {path!r} must look like 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AdapterError(f"{what} path {path!r} does not resolve: {exc}") from exc


def _resolve(spec: AdapterSpec) -> MoeArchAdapter:
    if isinstance(spec, MoeArchAdapter):
        return spec
    if isinstance(spec, str):
        spec = load_object(spec)
    if isinstance(spec, type) and issubclass(spec, MoeArchAdapter):
        return spec()
    raise AdapterError(f"{spec!r} is not a MoeArchAdapter subclass, instance or 'module:Class'")


class ArchRegistry(Mapping[str, MoeArchAdapter]):
    """Arch key -> adapter. Entries may be lazy ``"module:Class"`` paths, imported on access.

    The first read loads plugins; adapters registered by hand (``register``) take part too.
    """

    def __init__(self) -> None:
        self._specs: dict[str, AdapterSpec] = {}
        self._resolved: dict[str, MoeArchAdapter] = {}
        self._manual: set[str] = set()
        self._plugin_of: dict[str, str] = {}
        self._collected = False

    def register(self, spec: AdapterSpec, name: str | None = None) -> None:
        """Add an adapter by hand under its arch key (``name`` is required for lazy paths)."""
        self._manual.add(self._add(spec, name))

    def unregister(self, name: str) -> None:
        """Remove an arch key registered by hand."""
        self._specs.pop(name, None)
        self._resolved.pop(name, None)
        self._manual.discard(name)

    def _add(self, spec: AdapterSpec, name: str | None) -> str:
        if name is None:
            if isinstance(spec, str):
                raise AdapterError(f"lazy adapter {spec!r} needs an explicit arch name")
            name = spec.name
        self._specs[name] = spec
        self._resolved.pop(name, None)
        return name

    def _collect(self) -> None:
        if self._collected:
            return
        plugins.load_plugins()

        for impl in plugins.pm.hook.register_archs.get_hookimpls():

            def register(
                spec: AdapterSpec, name: str | None = None, plugin: str = impl.plugin_name
            ) -> None:
                self._plugin_of[self._add(spec, name)] = plugin

            impl.function(register=register)
        self._collected = True

    def provider(self, name: str) -> tuple[str | None, str | None]:
        """The distribution (and its version) that registered an arch key."""
        record = plugins.plugin_record(self._plugin_of.get(name, ""))
        if record is not None and record.distribution is not None:
            return record.distribution, record.version
        return _distribution_of(self[name])

    def refresh(self) -> None:
        """Ask the plugins again (after registering or unregistering a plugin)."""
        self._specs = {k: v for k, v in self._specs.items() if k in self._manual}
        self._resolved = {k: v for k, v in self._resolved.items() if k in self._manual}
        self._collected = False

    def __getitem__(self, name: str) -> MoeArchAdapter:
        self._collect()
        if name not in self._resolved:
            adapter = _resolve(self._specs[name])
            if adapter.name != name:
                raise AdapterError(
                    f"adapter {type(adapter).__name__} has name {adapter.name!r} but was "
                    f"registered as {name!r}"
                )
            self._resolved[name] = adapter
        return self._resolved[name]

    def __iter__(self) -> Iterator[str]:
        self._collect()
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        self._collect()
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        self._collect()
        return name in self._specs


REGISTRY = ArchRegistry()


def list_archs() -> list[MoeArchAdapter]:
    """Every registered adapter, sorted by arch key."""
    return [REGISTRY[name] for name in REGISTRY]


def get_adapter(name: str) -> MoeArchAdapter:
    """The adapter for an arch key, or an error that says how to install it."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise UnknownArchitectureError(_unknown_message(f"architecture {name!r}", name))


def _unknown_message(what: str, key: str | None) -> str:
    supported = ", ".join(REGISTRY) or "none (no adapter is installed)"
    family = KNOWN_FAMILIES.get(key or "")
    if family is not None:
        advice = f"{key} is provided by mach-adapter-{family}: {install_hint(family)}"
    else:
        advice = (
            f"mach's families install with {install_hint()}; other architectures need a "
            "third-party adapter package (see docs/writing-an-adapter.md)"
        )
    return f"no installed mach adapter supports {what}. Supported: {supported}. {advice}."


def _config_keys(config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    model_types = [config.get("model_type")]
    architectures = list(config.get("architectures") or [])
    text = config.get("text_config")
    if isinstance(text, Mapping):
        model_types.append(text.get("model_type"))
        architectures += list(text.get("architectures") or [])
    return [t for t in model_types if isinstance(t, str)], architectures


def detect_arch(
    config: Mapping[str, Any], tensor_names: Iterable[str] = (), arch: str | None = None
) -> MoeArchAdapter:
    """Pick the adapter for a checkpoint from its config and tensor names.

    Order: an explicit ``arch``; a plugin's ``detect_arch`` hook; ``model_type`` (also inside
    ``text_config``); ``architectures``. Raises ``UnknownArchitectureError`` naming the
    supported archs and the package that would add this one.
    """
    if arch is not None:
        return get_adapter(arch)
    REGISTRY._collect()
    names = frozenset(tensor_names)
    claimed = plugins.pm.hook.detect_arch(config=dict(config), tensor_names=names)
    if claimed is not None:
        return get_adapter(claimed)
    model_types, architectures = _config_keys(config)
    adapters = list_archs()
    for model_type in model_types:
        for adapter in adapters:
            if model_type in adapter.model_types or model_type == adapter.name:
                return adapter
    for architecture in architectures:
        for adapter in adapters:
            if architecture in adapter.architectures:
                return adapter
    if not model_types and not architectures:
        raise UnknownArchitectureError(
            "config.json has neither 'model_type' nor 'architectures'; pass arch=... "
            f"(one of: {', '.join(REGISTRY) or 'none installed'})"
        )
    key = model_types[0] if model_types else architectures[0]
    return _raise_unknown(key)


def _raise_unknown(key: str) -> MoeArchAdapter:
    raise UnknownArchitectureError(_unknown_message(f"model_type {key!r}", key))


def _distribution_of(obj: object) -> tuple[str | None, str | None]:
    top = type(obj).__module__.split(".")[0]
    dists = importlib_metadata.packages_distributions().get(top) or []
    if not dists:
        return None, None
    name = dists[0]
    try:
        return name, importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return name, None


def arch_summary(adapter: MoeArchAdapter) -> dict[str, Any]:
    """Capability fields of an adapter plus the distribution and version that provide it.

    ``continuous_batching``, ``prefix_reuse`` and ``quantized_kv`` are false while mach lacks
    the feature (``unavailable`` says why), else what the architecture's cache kind allows.
    """
    distribution, version = (
        REGISTRY.provider(adapter.name) if adapter.name in REGISTRY else _distribution_of(adapter)
    )
    from mach.capabilities import arch_features

    return {
        "name": adapter.name,
        "description": adapter.description,
        "model_types": list(adapter.model_types),
        "architectures": list(adapter.architectures),
        "kv_cache_kind": adapter.kv_cache_kind,
        "specdec_kind": adapter.specdec_kind,
        "swiglu_variant": adapter.swiglu_variant,
        "has_expert_bias": adapter.has_expert_bias,
        "layouts": [layout.value for layout in adapter.layouts],
        "routed_quantization": list(adapter.routed_quantization),
        "expert_stores": list(adapter.expert_stores),
        "cache_backends": list(adapter.cache_backends),
        **arch_features(adapter.kv_cache_kind),
        "distribution": distribution,
        "version": version,
    }


DrafterFactory = Callable[["LoadedModel"], "Drafter | None"]
"""``factory(loaded)``; ``None`` means no draft for this checkpoint (or it is switched off)."""


def drafter_factories() -> dict[str, DrafterFactory | str]:
    """Draft families registered by plugins (``register_drafters``), by ``specdec_kind``.

    A factory may be given lazily as ``"package.module:function"``.
    """
    plugins.load_plugins()
    # DFlash is core's own draft family; a plugin may register a replacement.
    found: dict[str, DrafterFactory | str] = {
        "specdec_v7": "mach.decode.dflash.drafter:make_dflash_drafter"
    }

    def register(name: str, factory: DrafterFactory | str) -> None:
        found[name] = factory

    plugins.pm.hook.register_drafters(register=register)
    return found


def make_drafter(loaded: LoadedModel) -> Drafter | None:
    """The adapter's draft family bound to a loaded model, or ``None`` when it has none."""
    adapter = loaded.adapter
    if adapter.specdec_kind is None:
        return None
    factory = drafter_factories().get(adapter.specdec_kind)
    if isinstance(factory, str):
        factory = load_object(factory, "drafter factory")
    return None if factory is None else factory(loaded)

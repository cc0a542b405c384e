"""Execution providers: find them, register plugin EPs, and report honestly where a graph ran.

onnxruntime falls back to the CPU silently: a session "with CUDA" may run every node on the CPU
(onnxruntime-gpu on a machine without a GPU does exactly that). So a session here always records
which EP each node was assigned to, and `Placement` says full / partial / none per provider.

Plugin EPs (onnxruntime >= 1.31) are shared libraries registered at run time:
- WebGPU: the `onnxruntime-ep-webgpu` package, or the private install made by
  `scripts/install_webgpu_ep.sh` (package + Mesa lavapipe), loaded by `webgpu_plugin`.
- OpenVINO: `onnxruntime-ep-openvino` (its device filter is Intel-only).
- MLX: `onnxruntime-ep-mlx` (macOS arm64 only).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort

from mlx_transformer.errors import UserError

from . import webgpu_plugin

# Short names accepted by `--provider`, and what onnxruntime calls them.
ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "mlx": "MLXExecutionProvider",
}
# IO binding keeps the KV cache on these devices between steps (OrtDevice type names).
DEVICE_TYPES = {
    "CUDAExecutionProvider": "cuda",
    "WebGpuExecutionProvider": "webgpu",
    "DmlExecutionProvider": "dml",
}
# Plugin EP packages: (registration name, module, how to get the library).
PLUGINS = (
    ("WebGpuExecutionProvider", "onnxruntime_ep_webgpu"),
    ("OpenVINOExecutionProvider", "onnxruntime_ep_openvino"),
    ("MLXExecutionProvider", "onnxruntime_ep_mlx"),
)

_registered: dict[str, str] = {}  # EP name -> library path (process-wide, like onnxruntime's)


class ProviderError(UserError):
    """An execution provider is unknown, not installed, or cannot run the model."""


def full_name(provider: str) -> str:
    """`webgpu` → `WebGpuExecutionProvider`; full names pass through."""
    return ALIASES.get(provider.lower(), provider)


# -- plugin EPs -----------------------------------------------------------------------------------


def _plugin_library(module_name: str) -> str | None:
    """The EP library of an installed plugin package, or None."""
    private = None
    if module_name == webgpu_plugin.PACKAGE:  # the package may be installed while Vulkan is private
        private = webgpu_plugin.setup()
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return webgpu_plugin.library_path(private) if private else None
    if hasattr(module, "get_library_path"):
        return module.get_library_path()
    return None


def register_plugins() -> dict[str, str]:
    """Register every plugin EP package that is installed; {EP name: library}. Idempotent."""
    for name, module_name in PLUGINS:
        if name in _registered:
            continue
        if module_name == "onnxruntime_ep_mlx":
            try:
                module = importlib.import_module(module_name)
                module.register_execution_provider_library()
                _registered[name] = module_name
            except Exception:  # not installed, or not macOS arm64
                pass
            continue
        library = _plugin_library(module_name)
        if library is None:
            continue
        try:
            ort.register_execution_provider_library(name, library)
        except Exception as e:  # e.g. registered already by someone else in this process
            if "already" not in str(e).lower():
                continue
        _registered[name] = library
    return dict(_registered)


def plugin_devices(name: str) -> list:
    """The OrtEpDevices that a registered plugin EP offers (empty: it sees no device here)."""
    return [d for d in ort.get_ep_devices() if d.ep_name == name]


def available() -> list[str]:
    """Providers this process can try: onnxruntime's built-in list plus registered plugins."""
    register_plugins()
    names = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    for name in _registered:
        if name not in names and plugin_devices(name):
            names.append(name)
    return names


# -- sessions -------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where the nodes of a session were assigned (after onnxruntime's graph optimizations)."""

    requested: str
    session_providers: list[str]
    nodes: dict[str, int] = field(default_factory=dict)  # EP name -> node count
    ops_on_cpu: list[str] = field(default_factory=list)  # op types left to the CPU EP

    @property
    def status(self) -> str:
        """ "full", "partial" or "none": how much of the graph ran on the requested provider."""
        on = self.nodes.get(self.requested, 0)
        total = sum(self.nodes.values())
        if self.requested == "CPUExecutionProvider" or on == total:
            return "full" if on == total and total else "none"
        return "partial" if on else "none"

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


def session_options(record: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if record:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return so


def create_session(
    model_path: str | Path,
    provider: str = "cpu",
    *,
    options: ort.SessionOptions | None = None,
    provider_options: dict | None = None,
    strict: bool = False,
) -> tuple[ort.InferenceSession, Placement]:
    """An InferenceSession on `provider` (CPU fallback allowed unless `strict`) and its Placement.

    Args:
        model_path: the .onnx file.
        provider: short name (cpu, cuda, webgpu, openvino, coreml, mlx) or onnxruntime's name.
        options: session options; by default ones that record node assignment.
        provider_options: options for the provider (e.g. {"device_type": "CPU"} for OpenVINO).
        strict: for a non-CPU provider, set `session.disable_cpu_ep_fallback`, so a node that
            the provider cannot run is an error instead of a silent CPU fallback.
    Raises:
        ProviderError: the provider is unknown or not installed.
    """
    name = full_name(provider)
    so = options or session_options()
    built_in = ort.get_available_providers()
    names = built_in if name in built_in else available()  # plugins only when asked for
    if name not in names:
        raise ProviderError(
            f"execution provider {provider!r} is not available here (available: "
            f"{', '.join(names)}); for WebGPU run scripts/install_webgpu_ep.sh"
        )
    # Registered plugin EPs are named like built-in ones once registered.
    providers: list = []
    if name != "CPUExecutionProvider":
        providers.append((name, provider_options or {}))
    if strict and name != "CPUExecutionProvider":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    else:
        providers.append("CPUExecutionProvider")
    try:
        session = ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as e:
        raise ProviderError(f"{name} cannot load {model_path}: {str(e).splitlines()[0]}") from e
    return session, placement(session, name)


def placement(session: ort.InferenceSession, requested: str) -> Placement:
    nodes: dict[str, int] = {}
    ops_on_cpu: set[str] = set()
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # recording was not enabled
        subgraphs = []
    for sub in subgraphs:
        assigned = sub.get_nodes()
        nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(assigned)
        if sub.ep_name == "CPUExecutionProvider" and requested != sub.ep_name:
            ops_on_cpu.update(n.op_type for n in assigned)
    return Placement(requested, session.get_providers(), nodes, sorted(ops_on_cpu))

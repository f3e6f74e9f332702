"""Metering at the source: the agent SDK (`Meter`), the OpenTelemetry bridge and the NVML GPU collector.

Names are imported lazily so `meterline --help` (which imports collectors.cli) stays fast.
"""
from importlib import import_module

_EXPORTS = {
    "Meter": ".sdk", "LlmCall": ".sdk", "ToolCall": ".sdk", "Session": ".sdk",
    "Sender": ".sender", "SenderStats": ".sender", "Spool": ".spool",
    "MeterSpanProcessor": ".otel", "GpuCollector": ".gpu",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

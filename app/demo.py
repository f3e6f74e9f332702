"""`meterline demo`: a simulated fleet against the whole pipeline (work in progress)."""
from __future__ import annotations

from meterline.console import fail


def demo_command() -> None:
    """Run the pipeline with a SIMULATED fleet of agents."""
    fail("`meterline demo` is not wired yet")

"""`meterline up`: the whole pipeline in one supervised process (work in progress)."""
from __future__ import annotations

from meterline.console import fail


def up_command() -> None:
    """Run streams, sink, allocator and the HTTP API in one supervised process."""
    fail("`meterline up` is not wired yet")

"""meterline's contracts: the records on every topic (see events.py) and the topic catalog."""
from .events import *  # noqa: F403
from .events import CONTRACTS, InvalidEvent, build, decode, new_id, utcnow  # noqa: F401

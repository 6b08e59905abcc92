"""A WeChat API emulator: a real HTTP server on 127.0.0.1 for tests, benchmarks and the demo.
Run it with ``python -m wxtoken.emulator``; see server.py for what it serves."""

from wxtoken.emulator.server import Emulator, main
from wxtoken.emulator.state import FAULT_MODES, Fault, Settings, State

__all__ = ["FAULT_MODES", "Emulator", "Fault", "Settings", "State", "main"]

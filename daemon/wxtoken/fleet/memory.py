"""What a fleet host remembers of its local file's token, in a private file beside its lock
(``<state_dir>/.locks/<app>.gen``), across restarts: it orders that token against Redis's
record by generation (fleet/store.py), never by clocks or expiries."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

from wxtoken.store import atomic_write


@dataclass
class Memory:
    """The generation the file's token was written under (for a token fetched while Redis was
    away: the highest generation seen then), a fingerprint of the token (a file changed behind
    the memory's back is of unknown generation), whether this host fetched it alone, and the
    highest generation seen."""

    seen: int = 0
    gen: int = 0
    token: str = ""
    alone: bool = False

    @classmethod
    def load(cls, path: str) -> Memory:
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read(4096))
            memory = cls(int(doc["seen"]), int(doc["gen"]), str(doc["token"]),
                         bool(doc["alone"]))
        except (OSError, ValueError, TypeError, KeyError):
            return cls()
        return memory if memory.seen >= 0 and memory.gen >= 0 else cls()

    def save(self, path: str) -> None:
        """Best effort: a memory lost or stale only makes the file's generation unknown, and
        Redis's record wins."""
        data = json.dumps(asdict(self), separators=(",", ":")).encode()
        try:
            atomic_write(path, data, 0o600, durable=False)
        except FileNotFoundError:  # a follower takes no lock: the private directory may not be
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
                atomic_write(path, data, 0o600, durable=False)
        except OSError:
            pass

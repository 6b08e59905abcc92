"""A component's ``component_verify_ticket`` file (``.private/ticket.json``, the daemon's
alone): the newest ticket WeChat pushed (``latest``) and the last one that yielded a token
(``good``, the fallback), each with when it was first received. A ticket is used for 12 hours
from its first receipt; health says when none came, or none for too long (:func:`ticket_problem`).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

from wxtoken.clock import human_delta
from wxtoken.store import atomic_write, json_number, read_json_object

TICKET_LIFE = 12 * 3600.0  # WeChat: a component_verify_ticket is good for 12 hours
PUSH_GAP = 1800.0  # no push for this long (three missed): pushes have stopped


class Notes(Protocol):
    """Where the pushes are noted for `wxtoken status` (.platform.json: ComponentFiles)."""

    def platform(self) -> dict[str, Any]: ...

    def note(self, durable: bool = False, **changes: Any) -> None: ...


class TicketFile:
    """The ticket file of one component."""

    def __init__(self, path: str, life: float, notes: Notes) -> None:
        self.path = path
        self.life = life
        self.notes = notes
        self._lock = threading.Lock()  # the file's read-modify-writes

    def read(self) -> dict[str, Any]:
        try:
            return read_json_object(self.path) or {}
        except ValueError:
            return {}

    def store(self, ticket: str, now: float) -> bool:
        """Keep a pushed ticket (durably) as the newest; False when it is the one already kept
        (WeChat pushes the same one again: only the push is noted, for health). The last one
        that yielded a token stays, as the fallback."""
        with self._lock:
            doc = self.read()
            latest = doc.get("latest") or {}
            known = latest.get("ticket") == ticket
            if not known:
                doc["latest"] = {"ticket": ticket, "received_at": now}
                atomic_write(self.path, json.dumps(doc).encode() + b"\n", 0o600)
        if known:  # pushed again: its age still counts from its first receipt
            self.notes.note(ticket_pushed_at=now)
            return False
        self.notes.note(ticket_received_at=now, ticket_pushed_at=now)
        return True

    def worked(self, ticket: str, now: float) -> None:
        """This ticket yielded a component token: it becomes the fallback."""
        with self._lock:
            doc = self.read()
            for slot in ("latest", "good"):
                entry = doc.get(slot) or {}
                if entry.get("ticket") == ticket:
                    doc["good"] = {**entry, "worked_at": now}
                    break
            else:
                return
            atomic_write(self.path, json.dumps(doc).encode() + b"\n", 0o600)

    def adopt(self, slot: str, ticket: str, received_at: float) -> bool:
        """Take a ticket another host of the fleet received (``latest``) or found working
        (``good``) when it is newer than this host's; True when the file changed."""
        with self._lock:
            doc = self.read()
            entry = doc.get(slot) or {}
            at = entry.get("received_at")
            if entry.get("ticket") == ticket or (isinstance(at, (int, float))
                                                  and at >= received_at):
                return False
            doc[slot] = {"ticket": ticket, "received_at": received_at}
            if slot == "good":
                doc[slot]["worked_at"] = received_at
            atomic_write(self.path, json.dumps(doc).encode() + b"\n", 0o600)
        if slot == "latest":  # pushed to another host then
            pushed = json_number(self.notes.platform().get("ticket_pushed_at"))
            self.notes.note(ticket_received_at=received_at,
                            ticket_pushed_at=max(pushed, received_at))
        return True

    def received_at(self, ticket: str) -> float | None:
        """When a kept ticket was received."""
        doc = self.read()
        for slot in ("latest", "good"):
            entry = doc.get(slot) or {}
            if entry.get("ticket") == ticket and isinstance(entry.get("received_at"),
                                                            (int, float)):
                return float(entry["received_at"])
        return None

    def usable(self, now: float) -> list[str]:
        """The tickets to try, newest first: those pushed less than 12 h ago."""
        doc = self.read()
        out: list[str] = []
        for slot in ("latest", "good"):
            entry = doc.get(slot) or {}
            ticket, at = entry.get("ticket"), entry.get("received_at")
            if isinstance(ticket, str) and ticket and isinstance(at, (int, float)) \
                    and now - at < self.life and ticket not in out:
                out.append(ticket)
        return out

    def newest_at(self) -> float | None:
        doc = self.read()
        times = [e.get("received_at") for e in (doc.get("latest") or {}, doc.get("good") or {})]
        valid = [t for t in times if isinstance(t, (int, float))]
        return max(valid) if valid else None


def ticket_problem(received_at: float | None, pushed_at: float | None, now: float,
                   life: float = TICKET_LIFE) -> str | None:
    """What health says of a component's ticket (None: nothing wrong). ``received_at``: when
    the newest ticket first came; its age counts from then (whether WeChat's pushing the same
    one again earns it a fresh 12 h is undocumented), and past ``life`` it is no longer used.
    ``pushed_at``: when a push last came (that ticket again, or a new one): while pushes keep
    coming, status says the ticket is old, not that none has come."""
    if received_at is None:
        return "no component_verify_ticket received yet"
    age = now - received_at
    if age < life:
        return None
    last = max(received_at, pushed_at or 0.0)
    hours = f"{life / 3600:g} h"
    if now - last < PUSH_GAP:
        return (f"the component_verify_ticket WeChat pushes has not changed for "
                f"{human_delta(age)} (pushed again {human_delta(now - last)} ago): older than "
                f"{hours} since its first receipt, it is no longer used")
    problem = (f"no component_verify_ticket for {human_delta(now - last)} (WeChat pushes one "
               "every 10 minutes: is it reaching callback_listen?)")
    if last > received_at:
        problem += f"; the last one pushed had not changed for {human_delta(age)}"
    return problem

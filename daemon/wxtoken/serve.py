"""The running daemon as a process: the entry point (``wxtoken run``) and what it opens beside
the daemon (the control endpoint, the Open Platform's callback). The demo starts the same.

The daemon (daemon.py) is the runtime; the listeners are the api layer above it, so they are
built here and handed to :meth:`Daemon.start`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys

import wxtoken
from wxtoken import __version__
from wxtoken.component.callback import CallbackServer
from wxtoken.config import Config
from wxtoken.control import ControlServer
from wxtoken.daemon import Daemon, Listener
from wxtoken.errors import ConfigError
from wxtoken.runinfo import remove_run_info, run_path, write_run_info


def listeners(daemon: Daemon) -> list[Listener]:
    """The callback (a ConfigError when it cannot listen) and the control endpoint (an error
    line, and none, when it cannot: tokens are still kept fresh)."""
    config = daemon.config
    out: list[Listener] = []
    if config.components and config.callback_listen is not None:
        host, port = config.callback_listen
        try:
            out.append(CallbackServer(config.callback_listen, daemon.platforms))
        except OSError as exc:
            where = host if port == 0 else f"{host}:{port}"  # port 0: a Unix socket
            raise ConfigError([f"{config.path}: callback_listen: cannot listen on "
                               f"{where}: {exc.strerror or exc}"]) from None
    try:
        out.append(ControlServer(config.control_socket, lambda: daemon.config, daemon.force,
                                 daemon.reload, daemon.ops, daemon.platforms))
    except OSError as exc:  # e.g. /run/wxtoken missing when run by hand: refresh is off
        # an error line: readers would otherwise find out during an outage, when their
        # passive refresh fails
        daemon.log.error("control.disabled", socket=config.control_socket,
                         reason=exc.strerror or str(exc),
                         impact="no passive refresh, reload over the socket or quota tools; "
                                "tokens are still kept fresh",
                         hint="create the socket's directory (or set control_socket) and "
                              "restart")
    return out


def start(daemon: Daemon) -> None:
    """Open the daemon, its listeners, and start it all."""
    daemon.open()
    daemon.start(listeners(daemon))


# modules a running daemon never needs (the test and demo tools, the wechatpy adapter)
NOT_PRELOADED = frozenset({"emulator", "demo", "wechatpy_session", "__main__"})


# what APScheduler would load by its entry points at first use (add_job without a trigger)
THIRD_PARTY_LAZY = ("apscheduler.triggers.date",)


def preload() -> None:
    """Import every module of the program the daemon may need later, before it is READY: an
    upgrade (apt, install.sh) replaces the files under the running daemon, which must never load
    a module of the new version beside the old ones (the reload code at the first SIGHUP, the
    Open Platform's at its first event, the quota tools at their first use)."""
    def walk(path: list[str], prefix: str) -> None:
        for module in pkgutil.iter_modules(path, prefix):
            if module.name.split(".")[1] in NOT_PRELOADED:
                continue  # never imported, not even to look inside
            imported = importlib.import_module(module.name)
            if module.ispkg:
                walk(list(imported.__path__), module.name + ".")

    walk(list(wxtoken.__path__), "wxtoken.")
    for name in THIRD_PARTY_LAZY:
        importlib.import_module(name)


def run(config: Config) -> int:
    """Run in the foreground until SIGTERM or SIGINT (SIGHUP reloads); return the exit code.

    The signals are blocked in every thread (the mask is set before any thread starts) and
    taken with sigwait() here: a Python handler that set an Event would deadlock if the signal
    arrived while this thread was inside that Event's wait().
    """
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # for good: the process ends here
    preload()
    daemon = Daemon(config)
    clean = True
    try:
        if (why := write_run_info(config.state_dir, __version__)) is not None:
            daemon.log.warning("daemon.run_info_failed", path=run_path(config.state_dir),
                               error=why, impact="wxtoken status cannot tell that it runs")
        start(daemon)
        while signal.sigwait(signals) == signal.SIGHUP:
            daemon.reload()  # the verdict goes to the journal
    finally:
        clean = daemon.stop()
        remove_run_info(config.state_dir)
    if not clean:
        # a thread stuck in a call that cannot be interrupted would keep the interpreter from
        # exiting (the executor's threads are joined at exit): leave now, the files are whole
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0

"""Real redis-server processes for the fleet tests: on a free loopback port (never 6379), no
persistence, in a directory of the test's own; Sentinel too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = shutil.which("redis-server")
# Sentinel demotes an old master that comes back only once it has been back for 8 s or more
# (and then kills its clients); with the commands it would send renamed away, that window
# stays open for as long as a test needs it.
UNDEMOTABLE = ("--rename-command", "SLAVEOF", "slaveof-renamed-by-the-test",
               "--rename-command", "REPLICAOF", "replicaof-renamed-by-the-test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class RedisServer:
    """A redis-server of the test's own; ``restart()`` brings it back empty on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, *args: str,
                 password: str | None = None, tls: tuple[Path, Path, Path] | None = None
                 ) -> None:
        """``tls``: (certificate, key, CA) to serve TLS only (no plain port)."""
        assert REDIS_SERVER is not None
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.args = (*args, *(("--requirepass", password) if password else ()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {} if self.tls is None else {
            "ssl": True, "ssl_ca_certs": str(self.tls[2])}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           password=self.password, **tls)

    def start(self) -> None:
        assert REDIS_SERVER is not None
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
            "--tls-key-file", str(self.tls[1]), "--tls-ca-cert-file", str(self.tls[2]),
            "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
             *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop, then start again: without persistence it comes back empty."""
        self.stop()
        self.start()


class Sentinels:
    """A master, a replica and three sentinels watching them, all on loopback."""

    def __init__(self, workdir: Path, name: str = "mymaster", *,
                 master_args: tuple[str, ...] = (), replica_args: tuple[str, ...] = ()
                 ) -> None:
        """``master_args``, ``replica_args``: more redis-server options for each."""
        self.name = name
        self.master = RedisServer(workdir / "master", None, *master_args)
        self.replica = RedisServer(workdir / "replica", None, "--replicaof", "127.0.0.1",
                                   str(self.master.port), *replica_args)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for i in range(3):
            port = free_port()
            conf = workdir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                f"sentinel monitor {name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
                f"sentinel parallel-syncs {name} 1\n")
            assert REDIS_SERVER is not None
            self.procs.append(subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            self.ports.append(port)
        self._wait(lambda: all(self._watching(p) for p in self.ports))

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    @staticmethod
    def _sentinel(port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    @staticmethod
    def _wait(check: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, KeyError):
                pass
            assert time.monotonic() < deadline, "sentinels not ready"
            time.sleep(0.2)

    def _watching(self, port: int) -> bool:
        """Whether the sentinel on ``port`` knows the replica and the other two sentinels."""
        master: Any = self._sentinel(port).sentinel_master(self.name)
        return bool(master["num-slaves"] >= 1 and master["num-other-sentinels"] >= 2)

    def master_port(self) -> int:
        address: Any = self._sentinel(self.ports[0]).sentinel_get_master_addr_by_name(self.name)
        return int(address[1])

    def fail_over(self) -> None:
        """Kill the master; wait until the sentinels promoted the replica."""
        assert self.master.proc is not None
        self.master.proc.kill()
        self.master.proc.wait()
        self._wait(lambda: self.master_port() == self.replica.port)

    @contextlib.contextmanager
    def paused(self, server: RedisServer) -> Iterator[None]:
        """``server`` stopped (SIGSTOP) for the block, SIGCONT after it: its connections stay
        open, as through a long GC or VM pause, or a partition that heals."""
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

    def states(self) -> list[dict[str, Any]]:
        """What each sentinel reports of the master (SENTINEL MASTER: port, flags, …)."""
        states: list[Any] = [self._sentinel(p).sentinel_master(self.name) for p in self.ports]
        return states

    def wait_promoted(self) -> None:
        """Wait until every sentinel names the replica as the master, its failover over."""
        self._wait(lambda: all(s["port"] == self.replica.port
                               and "failover_in_progress" not in s["flags"]
                               for s in self.states()))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        self.replica.stop()
        self.master.stop()

"""wxtoken benchmarks: prints one table of figures against the goals of PRODUCT.md.

Run with ``./dev.sh bench`` (installs redis-server for the Redis comparison when it can).
Not a test: it measures and prints; the README's Performance section quotes its output.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from wxtoken.emulator import Emulator
from wxtoken.reader import drop_cache, read_token
from wxtoken.record import TokenRecord
from wxtoken.store import atomic_write

ROWS: list[tuple[str, str, str]] = []
BENCH_APPID = "wx0000000000000001"  # an AppID's shape: "wx" + 16 lowercase hex digits


def row(what: str, figure: str, goal: str = "") -> None:
    ROWS.append((what, figure, goal))
    print(f"  {what}: {figure}  {goal}", file=sys.stderr, flush=True)


def per_op(fn: Callable[[], object], n: int) -> float:
    """Best of 5 runs of n calls, in nanoseconds per call."""
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - begin) / n)
    return best


def write_token(state: Path, app: str = "main") -> None:
    now = int(time.time())
    rec = TokenRecord(app, "wx1", "78_" + "x" * 130, now + 7200, now)
    atomic_write(str(state / f"{app}.json"), rec.to_json(), 0o640)


# -- readers ---------------------------------------------------------------------------------------
def bench_readers(tmp: Path) -> None:
    state = tmp / "state"
    state.mkdir(parents=True)
    write_token(state)
    path = str(state / "main.json")
    sd = str(state)
    read_token("main", sd)
    stat_ns = per_op(lambda: os.stat(path), 200_000)
    hot_ns = per_op(lambda: read_token("main", sd), 200_000)

    def cold() -> object:
        drop_cache()
        return read_token("main", sd)

    cold_ns = per_op(cold, 20_000)

    def open_json() -> object:
        with open(path, "rb") as fh:
            return json.load(fh)

    json_ns = per_op(open_json, 20_000)
    row("os.stat (reference)", f"{stat_ns:.0f} ns", "")
    row("read_token hot", f"{hot_ns:.0f} ns = {hot_ns / stat_ns:.2f} x os.stat",
        "goal <= 0.5 x os.stat")
    row("read_token cold (cache dropped)", f"{cold_ns:.0f} ns = {cold_ns / stat_ns:.1f} x", "")
    row("open + json.load per read", f"{json_ns:.0f} ns = {json_ns / stat_ns:.1f} x", "")
    redis_ns = bench_redis(tmp)
    if redis_ns is not None:
        row("Redis GET over loopback", f"{redis_ns:.0f} ns = {redis_ns / stat_ns:.0f} x", "")
    http_ns = bench_http(path)
    row("HTTP GET over loopback (keep-alive)", f"{http_ns:.0f} ns = {http_ns / stat_ns:.0f} x",
        "")


def bench_redis(tmp: Path) -> float | None:
    server = shutil.which("redis-server")
    if server is None:
        row("Redis GET over loopback", "skipped: redis-server not installed")
        return None
    import redis
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.set("wxtoken:main", "78_" + "x" * 130)
        return per_op(lambda: client.get("wxtoken:main"), 5_000)
    finally:
        proc.terminate()
        proc.wait()


def bench_http(path: str) -> float:
    body = Path(path).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = -1  # headers and body in one send (no Nagle/delayed-ACK stall)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])

    def get() -> object:
        conn.request("GET", "/v1/apps/main")
        return conn.getresponse().read()

    try:
        return per_op(get, 3_000)
    finally:
        conn.close()
        server.shutdown()


def bench_import() -> None:
    code = ("import resource, sys, time; t = time.perf_counter(); from wxtoken import read_token;"
            " d = time.perf_counter() - t; "
            "bad = [m for m in ('requests', 'apscheduler', 'structlog') if m in sys.modules]; "
            "print(d, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, bad)")
    base = ("import resource, time; t = time.perf_counter(); import json; "
            "d = time.perf_counter() - t; "
            "print(d, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, [])")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split(maxsplit=2) for _ in range(5)]
    bare = [subprocess.run([sys.executable, "-c", base], capture_output=True, text=True,
                           check=True).stdout.split(maxsplit=2) for _ in range(5)]
    ms = statistics.median(float(r[0]) * 1000 for r in runs)
    json_ms = statistics.median(float(b[0]) * 1000 for b in bare)
    extra = statistics.median(int(r[1]) for r in runs) - statistics.median(int(b[1]) for b in bare)
    row("`from wxtoken import read_token`", f"{ms:.1f} ms (of which `import json` {json_ms:.1f}),"
        f" +{extra / 1024:.1f} MB RSS over `import json`, daemon modules loaded: "
        f"{runs[0][2].strip()}", "goal: a few ms, none loaded")


# -- daemons ---------------------------------------------------------------------------------------
def config_file(tmp: Path, emu: Emulator, apps: dict[str, str], **top: Any) -> Path:
    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    lines = [f'state_dir = "{state}"', f'api_base = "{emu.url}"', 'log_format = "json"',
             f'control_socket = "{tempfile.mkdtemp(prefix="wxb-", dir="/tmp")}/c.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for name, appid in apps.items():
        lines += [f"[apps.{name}]", f'appid = "{appid}"', f'secret = "bench-{appid}"']
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start(config: Path, notify: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if notify:
        env["NOTIFY_SOCKET"] = notify
    return subprocess.Popen([sys.executable, "-m", "wxtoken", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_ready(sock: socket.socket, timeout: float = 120) -> None:
    sock.settimeout(timeout)
    while sock.recv(200) != b"READY=1":
        pass


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int) -> int:
    """Voluntary context switches of all the process's threads: each is a sleep that ended."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def notify_socket(tmp: Path) -> tuple[socket.socket, str]:
    path = tempfile.mkdtemp(prefix="wxn-", dir="/tmp") + "/n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, path


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def bench_one_app(tmp: Path, idle: float) -> None:
    with Emulator({BENCH_APPID: f"bench-{BENCH_APPID}"}) as emu:
        config = config_file(tmp, emu, {"main": BENCH_APPID})
        sock, path = notify_socket(tmp)
        proc = start(config, path)
        wait_ready(sock)
        stop(proc)
        times = []
        for _ in range(5):
            t = time.monotonic()
            proc = start(config, path)
            wait_ready(sock)
            times.append(time.monotonic() - t)
            stop(proc)
        row("start to READY, token reused (median of 5)",
            f"{statistics.median(times) * 1000:.0f} ms", "goal <= 500 ms")
        proc = start(config, path)
        wait_ready(sock)
        time.sleep(2)
        cpu0, wake0 = cpu_s(proc.pid), wakeups(proc.pid)
        time.sleep(idle)
        cpu, woke = cpu_s(proc.pid) - cpu0, wakeups(proc.pid) - wake0
        row(f"idle daemon, 1 app, over {idle:.0f} s", f"RSS {rss_mb(proc.pid):.1f} MB, "
            f"CPU {cpu * 1000:.0f} ms, {woke} thread wake-ups "
            f"({woke * 60 / idle:.1f} a minute: the monitor's clock check)",
            "goal RSS <= 40 MB, no polling")
        stop(proc)
        assert emu.calls() == 1, emu.calls()
        row("upstream calls for 6 starts with a valid token", f"{emu.calls()} (the first start)",
            "goal: 0 on restart")


def bench_scaled_day(tmp: Path, daemons: int, restarts: int, day: float) -> None:
    """K daemons on one state dir over a scaled day (24 intervals), one restarted R times."""
    interval = day / 24
    with Emulator({BENCH_APPID: f"bench-{BENCH_APPID}"}) as emu:
        config = config_file(tmp, emu, {"main": BENCH_APPID}, refresh_interval=interval)
        procs = [start(config) for _ in range(daemons)]
        end = time.monotonic() + day
        for _ in range(restarts):
            time.sleep(day / (restarts + 1))
            stop(procs[0])
            procs[0] = start(config)
        time.sleep(max(0.0, end - time.monotonic()))
        for p in procs:
            stop(p)
        row(f"upstream calls, {daemons} daemons + {restarts} restarts, scaled day "
            f"({day:.0f} s = 24 x {interval:.1f} s)", f"{emu.calls()}",
            "ideal 25 (24 refreshes + the first fetch)")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


GOALS = {1000: ("goal <= 60 s, bounded concurrency", "goal <= 80 MB"),
         10000: ("goal <= 240 s, bounded concurrency", "goal <= 150 MB")}


def bench_many_apps(tmp: Path, n: int, latency: float) -> None:
    """n apps from scratch (first round), then a restart with every file valid."""
    apps = {f"app{i:05d}": f"wx{i:016d}" for i in range(n)}
    goal_time, goal_rss = GOALS.get(n, ("bounded concurrency", ""))
    with Emulator({appid: f"bench-{appid}" for appid in apps.values()}, latency=latency) as emu:
        config = config_file(tmp, emu, apps)
        sock, path = notify_socket(tmp)
        t = time.monotonic()
        proc = start(config, path)
        wait_ready(sock, timeout=900)
        took = time.monotonic() - t
        time.sleep(3)
        peak = peak_mb(proc.pid)
        stop(proc)
        files = len([p for p in (tmp / "state").glob("app*.json")
                     if not p.name.endswith(".status.json")])
        stats = emu.stats()
        row(f"{n} apps, upstream {latency * 1000:.0f} ms: first round",
            f"{took:.1f} s, {files} files, {stats['total_calls']} calls, "
            f"max {stats['max_inflight']} concurrent", goal_time)
        row(f"{n} apps: daemon peak RSS (first round)", f"{peak:.1f} MB", goal_rss)
        calls = stats["total_calls"]
        t = time.monotonic()
        proc = start(config, path)
        wait_ready(sock, timeout=300)
        ready = time.monotonic() - t
        stop(proc)
        row(f"{n} apps: restart with every file valid", f"READY in {ready:.1f} s, "
            f"{emu.stats()['total_calls'] - calls} calls", "goal: seconds, 0 calls")


# -- the Open Platform ------------------------------------------------------------------------
PLATFORM_AES = "BenchEncodingAESKey0123456789abcdefghijklmn"


def bench_platform(tmp: Path, n: int, latency: float, callback_seconds: float) -> None:
    """n authorizers that authorized while the daemon was away: found in the authorizer list
    at start, every token fetched (first round); a restart with every file valid; then the
    callback endpoint under a flood of (distinct, valid) ticket pushes."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    comp_appid = "wx00000000000bec01"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Emulator({}, latency=latency) as emu:
        comp = emu.platforms.add(comp_appid, "bench-component-secret", "bench-msg-token",
                                 PLATFORM_AES,
                                 f"http://127.0.0.1:{port}/components/bench/callback",
                                 push_every=2)
        for i in range(n):
            emu.platforms.authorize(comp_appid, f"wxbench{i:011d}", push=False)
        config = config_file(tmp, emu, {}, callback_listen=f"127.0.0.1:{port}")
        with config.open("a") as fh:
            fh.write(f'[components.bench]\ncomponent_appid = "{comp_appid}"\n'
                     'secret = "bench-component-secret"\nmsg_token = "bench-msg-token"\n'
                     f'encoding_aes_key = "{PLATFORM_AES}"\n')
        directory = tmp / "state" / "components" / "bench"
        sock, path = notify_socket(tmp)
        t = time.monotonic()
        proc = start(config, path)
        wait_ready(sock, timeout=120)

        def tokens() -> int:
            try:
                return sum(1 for e in os.scandir(directory) if e.name.startswith("wxbench0")
                           and e.name.endswith(".json") and not e.name.endswith(".status.json"))
            except OSError:
                return 0

        peak = 0.0
        while tokens() < n and time.monotonic() - t < 1800:
            peak = max(peak, peak_mb(proc.pid))
            time.sleep(1)
        took = time.monotonic() - t
        time.sleep(2)
        peak = max(peak, peak_mb(proc.pid))
        stop(proc)
        stats = emu.stats()
        row(f"Open Platform, {n} authorizers, upstream {latency * 1000:.0f} ms: first round",
            f"{took:.1f} s, {tokens()} files, {stats['total_calls']} calls, max "
            f"{stats['max_inflight']} concurrent", "bounded concurrency")
        row(f"Open Platform, {n} authorizers: daemon peak RSS", f"{peak:.1f} MB",
            "goal <= 150 MB")
        calls = emu.stats()["total_calls"]
        comp.pushing = False
        t = time.monotonic()
        proc = start(config, path)
        wait_ready(sock, timeout=300)
        ready = time.monotonic() - t
        time.sleep(2)
        row(f"Open Platform, {n} authorizers: restart with every file valid",
            f"READY in {ready:.1f} s, {emu.stats()['total_calls'] - calls} calls",
            "goal <= 5 s, 0 calls")
        url = f"http://127.0.0.1:{port}/components/bench/callback"
        messages = [emu.platforms.sealed(comp, emu.platforms.message(comp, {
            "InfoType": "component_verify_ticket",
            "ComponentVerifyTicket": emu.platforms.new_ticket(comp)})) for _ in range(4000)]
        done = 0
        lock = threading.Lock()
        deadline = time.monotonic() + callback_seconds

        def client(k: int) -> None:
            nonlocal done
            with requests.Session() as session:
                for query, body in messages[k::8]:
                    if time.monotonic() > deadline:
                        return
                    resp = session.post(url, params=query, data=body, timeout=5)
                    if resp.status_code == 200 and resp.text == "success":
                        with lock:
                            done += 1

        t = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, range(8)))
        rate = done / (time.monotonic() - t)
        stop(proc)
        row("Open Platform: callback requests answered (8 clients, distinct signed tickets)",
            f"{rate:.0f} per second", "WeChat sends one every 10 minutes")


# -- the fleet ------------------------------------------------------------------------------
def fleet_config(tmp: Path, emu: Emulator, redis_url: str, n: int, follower: bool,
                 **top: Any) -> Path:
    base = tmp / f"host{n}"
    state = base / "state"
    state.mkdir(parents=True)
    lines = [f'state_dir = "{state}"', f'api_base = "{emu.url}"', 'log_format = "json"',
             f'control_socket = "{tempfile.mkdtemp(prefix="wxb-", dir="/tmp")}/c.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["[redis]", f'url = "{redis_url}"', "[apps.main]",
              f'appid = "{BENCH_APPID}"']
    if not follower:
        lines.append(f'secret = "bench-{BENCH_APPID}"')
    path = base / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    server = shutil.which("redis-server")
    if server is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, port


def bench_fleet(tmp: Path, hosts: int, seconds: float, idle: float, day: float) -> None:
    tmp.mkdir(parents=True)
    started = start_redis(tmp)
    if started is None:
        row("fleet", "skipped: redis-server not installed")
        return
    redis_proc, port = started
    import redis
    r = redis.Redis(port=port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with Emulator({BENCH_APPID: f"bench-{BENCH_APPID}"}) as emu:
            # propagation: 3 candidates and 7 followers, a refresh every 2 s
            configs = [fleet_config(tmp / "prop", emu, url, i, follower=i >= 3,
                                    refresh_interval=2, renew_before=4) for i in range(hosts)]
            procs = [start(c) for c in configs]
            files = [c.parent / "state" / "main.json" for c in configs]
            time.sleep(3)
            lags: list[float] = []
            first: dict[str, float] = {}
            seen: list[set[str]] = [set() for _ in files]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for i, path in enumerate(files):
                    try:
                        token = json.loads(path.read_bytes())["access_token"]
                    except (OSError, ValueError):
                        continue
                    if token not in seen[i]:
                        seen[i].add(token)
                        now = time.monotonic()
                        if token not in first:
                            first[token] = now
                        else:
                            lags.append(now - first[token])
                time.sleep(0.002)
            for p in procs:
                stop(p)
            lags.sort()
            p50 = lags[len(lags) // 2] * 1000 if lags else float("nan")
            p99 = lags[int(len(lags) * 0.99)] * 1000 if lags else float("nan")
            row(f"fleet: a refresh reaches every file, {hosts} hosts on loopback",
                f"p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(lags)} file updates)",
                "goal p99 <= 1 s")
            # idle: Redis commands per host per minute
            configs = [fleet_config(tmp / "idle", emu, url, i, follower=i >= 3)
                       for i in range(hosts)]
            procs = [start(c) for c in configs]
            time.sleep(5)
            before = int(r.info("stats")["total_commands_processed"])
            time.sleep(idle)
            after = int(r.info("stats")["total_commands_processed"]) - 1
            for p in procs:
                stop(p)
            per = (after - before) / hosts / (idle / 60)
            row(f"fleet: idle, Redis commands per host per minute ({hosts} hosts)",
                f"{per:.1f}", "goal: a few a minute, no polling")
            # a scaled day: 5 candidates, one restarted 5 times
            calls = emu.calls()
            configs = [fleet_config(tmp / "day", emu, url, i, follower=False,
                                    refresh_interval=day / 24, renew_before=4)
                       for i in range(5)]
            procs = [start(c) for c in configs]
            finish = time.monotonic() + day
            for _ in range(5):
                time.sleep(day / 6)
                stop(procs[0])
                procs[0] = start(configs[0])
            time.sleep(max(0.0, finish - time.monotonic()))
            for p in procs:
                stop(p)
            row(f"fleet: upstream calls, 5 hosts + 5 restarts, scaled day ({day:.0f} s)",
                f"{emu.calls() - calls}", "ideal 25, as one host")
    finally:
        redis_proc.terminate()
        redis_proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement seconds")
    parser.add_argument("--day", type=float, default=24.0, help="scaled day in seconds")
    parser.add_argument("--apps", default="1000,10000",
                        help="comma-separated app counts for the many-apps rows")
    parser.add_argument("--authorizers", type=int, default=10000,
                        help="authorizers of the Open Platform rows")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wxtoken-bench-"))
    try:
        print("readers (same run, same file):", file=sys.stderr)
        bench_readers(tmp / "r")
        bench_import()
        print("daemon:", file=sys.stderr)
        bench_one_app(tmp / "one", args.idle)
        bench_scaled_day(tmp / "day", 3, 5, args.day)
        for n in (int(x) for x in args.apps.split(",") if x):
            bench_many_apps(tmp / f"many{n}", n, 0.05)
        print("Open Platform:", file=sys.stderr)
        bench_platform(tmp / "platform", args.authorizers, 0.05, 5.0)
        print("fleet:", file=sys.stderr)
        bench_fleet(tmp / "fleet", 10, 40.0, args.idle, args.day * 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[0]) for r in ROWS)
    fig = max(len(r[1]) for r in ROWS)
    print(f"\n| {'measure'.ljust(width)} | {'figure'.ljust(fig)} | goal |")
    print(f"|{'-' * (width + 2)}|{'-' * (fig + 2)}|------|")
    for what, figure, goal in ROWS:
        print(f"| {what.ljust(width)} | {figure.ljust(fig)} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

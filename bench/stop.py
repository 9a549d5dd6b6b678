#!/usr/bin/env python3
"""A stop under load: how many connections the kernel accepted are left
unanswered (reset, or closed under the request) when the master gets TERM.

One WSGI app (bench/stop_app.py: each request held 20 ms, then answered), 4
workers, three servers:

  arbiterd            -w 4 -- python3 -m arbiter_preload stop_app:app
  arbiterd --shutdown-delay 2   the same, with a 2 s drain window
  gunicorn            -w 4 -k sync stop_app:app

32 client threads loop connect / GET / read / close as fast as they are served.
After 2 s the master gets TERM; the clients then either

  stop 1 s after TERM   (a balancer that took the instance out), or
  go on until refused   (nobody took it out: traffic does not stop),

and each client also stops at its first refused connection once TERM was sent
(the instance is gone). Every connection is counted once: answered (a whole 200),
accepted but unanswered (connect succeeded, then a reset, an EOF or a 10 s
timeout before the whole answer), or refused (connect failed).

Usage, from the repository root, after `cargo build --release --bins` and with
gunicorn 27.0.1 in bench/.venv (`python3 -m venv bench/.venv &&
bench/.venv/bin/pip install gunicorn==27.0.1`):

    bench/.venv/bin/python bench/stop.py [--runs 3]

Prints a Markdown report. Stdlib only; every server runs in a session of its own
and is killed with it.
"""

import argparse
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ARBITERD = os.path.join(ROOT, "target", "release", "arbiterd")
PY = sys.executable
WARM = 2.0
AFTER = 1.0
CAP = 60.0  # the longest a run's clients go on after TERM


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(port, timeout=10.0):
    """One connection: 'answered', 'unanswered: why' or 'refused: why'; and the
    pid that answered."""
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2.0)
    except OSError as e:
        return f"refused: {type(e).__name__}", None
    with c:
        c.settimeout(timeout)
        try:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = None
                    for line in head.split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v.strip())
                    if length is not None and len(body) >= length:
                        break
        except OSError as e:
            return f"unanswered: {type(e).__name__}", None
    head, sep, body = data.partition(b"\r\n\r\n")
    if not data:
        return "unanswered: closed", None
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        return f"unanswered: {head.split(b' ')[1:2]}", None
    pid = None
    if b'"pid"' in body:
        try:
            pid = int(body.split(b":")[1].strip(b" }\n"))
        except ValueError:
            pass
    return "answered", pid


class Server:
    def __init__(self, name, argv, env, scratch):
        self.name, self.argv = name, argv
        self.log_path = os.path.join(scratch, name.replace(" ", "_") + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=BENCH,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def servers(port, scratch, delay):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), BENCH])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for k in ("LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET"):
        env.pop(k, None)
    control = os.path.join(scratch, f"c{port}.sock")
    arbiterd = [
        ARBITERD, "-n", f"stop{port}", "-b", f"127.0.0.1:{port}", "--control", control,
        "-w", "4", "--ready", "notify",
    ]
    app = ["--", PY, "-m", "arbiter_preload", "stop_app:app"]
    return {
        "arbiterd": (arbiterd + app, env),
        f"arbiterd --shutdown-delay {delay:g}": (
            arbiterd + ["--shutdown-delay", f"{delay:g}"] + app,
            env,
        ),
        "gunicorn": (
            [PY, "-m", "gunicorn", "-w", "4", "-k", "sync", "-b", f"127.0.0.1:{port}", "stop_app:app"],
            env,
        ),
    }


def wait_serving(port, workers, deadline):
    """Until `workers` distinct pids have answered (bursts of 2N at once)."""
    seen = set()
    while time.monotonic() < deadline:
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(exchange(port, 2.0)))
            for _ in range(2 * workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen |= {pid for outcome, pid in results if outcome == "answered" and pid}
        if len(seen) >= workers:
            return True
        time.sleep(0.05)
    return False


def one_run(name, argv, env, port, scratch, clients, traffic):
    srv = Server(name, argv, env, scratch)
    try:
        if not wait_serving(port, 4, time.monotonic() + 60):
            raise RuntimeError(f"{name} did not serve; log {srv.log_path}")
        lock = threading.Lock()
        counts = {"answered": 0, "answered_after": 0, "unanswered": 0, "refused": 0, "refused_before": 0}
        kinds = {}
        term_at = [None]
        stop = threading.Event()

        def client():
            while not stop.is_set():
                outcome, _ = exchange(port)
                after = term_at[0] is not None
                with lock:
                    kind = outcome.split(":")[0]
                    if kind == "refused" and not after:
                        counts["refused_before"] += 1
                    else:
                        counts[kind] += 1
                    if kind == "answered" and after:
                        counts["answered_after"] += 1
                    if kind != "answered":
                        kinds[outcome] = kinds.get(outcome, 0) + 1
                if after and (kind == "refused" or (traffic == "stops" and time.monotonic() >= term_at[0] + AFTER)):
                    return
                if after and time.monotonic() >= term_at[0] + CAP:
                    return

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(WARM)  # the load before TERM: a span, not a state
        load_before = os.getloadavg()[0]
        term_at[0] = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        exited = None
        while time.monotonic() < term_at[0] + CAP + 30:
            if exited is None and srv.proc.poll() is not None:
                exited = time.monotonic() - term_at[0]
            if exited is not None and not any(t.is_alive() for t in threads):
                break
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(15)
        return {
            "server": name,
            "traffic": traffic,
            **counts,
            "kinds": kinds,
            "exit_secs": exited,
            "exit_code": srv.proc.returncode,
            "load": load_before,
        }
    finally:
        srv.kill()


def report(rows, args, command):
    out = []
    out.append(
        f"{args.clients} closed-loop clients, `bench/stop_app.py` (each request held 20 ms) on 4 "
        "workers, TERM to the master after 2 s of load. *Unanswered*: connections the kernel "
        "accepted (connect succeeded) that got a reset, an EOF or a 10 s timeout instead of a "
        "whole answer; *refused*: connect failed after TERM (no listener left: a balancer "
        "retries those elsewhere); a client stops at its first refusal after TERM."
    )
    out.append("")
    for traffic, title in (
        ("stops", "Clients stop 1 s after TERM (a balancer took the instance out)"),
        ("goes on", "Clients go on until refused (nobody took the instance out)"),
    ):
        if not any(r["traffic"] == traffic for r in rows):
            continue
        out.append(f"**{title}**")
        out.append("")
        out.append(
            "| server | accepted but unanswered, per run | median | refused | answered after TERM | TERM to exit | load avg |"
        )
        out.append("|---|---|---|---|---|---|---|")
        names = []
        for r in rows:
            if r["server"] not in names:
                names.append(r["server"])
        for name in names:
            rs = [r for r in rows if r["server"] == name and r["traffic"] == traffic]
            if not rs:
                continue
            un = [r["unanswered"] for r in rs]
            out.append(
                "| {} | {} | {:g} | {} | {} | {} | {} |".format(
                    name,
                    ", ".join(str(u) for u in un),
                    statistics.median(un),
                    ", ".join(str(r["refused"]) for r in rs),
                    ", ".join(str(r["answered_after"]) for r in rs),
                    ", ".join("-" if r["exit_secs"] is None else f"{r['exit_secs']:.2f} s" for r in rs),
                    ", ".join(f"{r['load']:.2f}" for r in rs),
                )
            )
        out.append("")
    kinds = {}
    for r in rows:
        for k, n in r["kinds"].items():
            if k.startswith("unanswered"):
                kinds[(r["server"], k)] = kinds.get((r["server"], k), 0) + n
    if kinds:
        out.append(
            "Unanswered, by what the client saw (all runs): "
            + "; ".join(f"{s}: {k.split(': ', 1)[1]} {n}" for (s, k), n in sorted(kinds.items()))
            + "."
        )
        out.append("")
    out.append("To reproduce:")
    out.append("")
    out.append(f"    {command}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--delay", type=float, default=2.0, help="--shutdown-delay of the second server")
    ap.add_argument("--only", default="stops,goes on", help="client behaviours: 'stops', 'goes on'")
    args = ap.parse_args()
    try:
        import gunicorn  # noqa: F401

        gver = gunicorn.__version__
    except ImportError:
        sys.exit("stop.py: gunicorn is not importable by this Python; run it with bench/.venv/bin/python")
    if not os.access(ARBITERD, os.X_OK):
        sys.exit(f"stop.py: {ARBITERD} missing: cargo build --release --bins")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = shlex.join(["bench/.venv/bin/python", "bench/stop.py"] + sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="arbstop") as scratch:
        for traffic in [t.strip() for t in args.only.split(",")]:
            for run in range(args.runs):
                for name in servers(0, scratch, args.delay):
                    port = free_port()
                    argv, env = servers(port, scratch, args.delay)[name]
                    r = one_run(name, argv, env, port, scratch, args.clients, traffic)
                    rows.append(r)
                    print(
                        f"# {traffic} run {run + 1} {name}: unanswered {r['unanswered']} refused "
                        f"{r['refused']} answered after TERM {r['answered_after']} exit "
                        f"{r['exit_secs']} code {r['exit_code']} {r['kinds']}",
                        file=sys.stderr,
                    )
    print(
        f"Measured by `bench/stop.py` at git `{rev}`, release build, Python "
        f"{sys.version.split()[0]}, gunicorn {gver}, {os.cpu_count()} cores shared with other "
        "engineers' builds and tests.\n"
    )
    print(report(rows, args, command))


if __name__ == "__main__":
    main()

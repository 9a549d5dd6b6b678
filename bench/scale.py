#!/usr/bin/env python3
"""The master at scale: two arbiterd builds side by side, interleaved.

    python3 bench/scale.py --baseline OLD/arbiterd --candidate NEW/arbiterd \\
        --ctl PATH/arbiterctl --workers 1024,4096 --repeat 3 [--write]

For each run, each containment mode (--cgroup on,off) and each N, one build then
the other (the order alternates between runs), one master at a time, with the
built-in worker (no COMMAND): boot time to N ready workers, the master's wakeups
and CPU time while idle, its fds and RSS, the raw status request back to back and
one a second, `arbiterctl status --json`, the master's CPU while `arbiterctl top`
refreshes every second, SIGTTIN until the new worker serves. Prints a markdown
table per mode; with --write, puts them into a section of bench/RESULTS.md
(--section, default "## Master at scale (before/after the owned-parts redesign)").
See bench/README.md. Stdlib only; the /proc helpers and the process keeper
(sessions, child subreaper, PDEATHSIG, kill on exit) are bench/run.py's.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
SCRATCH = os.path.join(BENCH, ".work")
RESULTS = os.path.join(BENCH, "RESULTS.md")
SECTION = "## Master at scale (before/after the owned-parts redesign)"
# arbiterd's --max-workers unless told otherwise: above it, the masters are given it.
DEFAULT_MAX_WORKERS = 1024

sys.dont_write_bytecode = True
sys.path.insert(0, BENCH)
import run as harness  # noqa: E402  (bench/run.py: /proc helpers, Processes)

PROCS = None
STATUS_REQ = b'{"v":1,"cmd":"status"}\n'


def log(msg):
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def shown_path(p):
    """A path as the report shows it: relative to the repository root if inside it."""
    a = os.path.abspath(p)
    return os.path.relpath(a, ROOT) if a.startswith(ROOT + os.sep) else a


def all_children(pid):
    """Live children of every thread of a process."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def raw_status(path, timeout=30.0):
    """One status request on a fresh connection: (seconds from connect to the whole
    reply line read, the reply bytes). The reply is one line; it is not parsed here."""
    t = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)
        c.sendall(STATUS_REQ)
        chunks = []
        while True:
            chunk = c.recv(1 << 20)
            if not chunk:
                raise RuntimeError("control socket closed before the whole reply")
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    return time.perf_counter() - t, b"".join(chunks)


def status_reply(data):
    doc = json.loads(data)
    if not doc.get("ok"):
        raise RuntimeError(f"status answered {data[:200]!r}")
    return doc["reply"]


class Build:
    def __init__(self, label, path):
        self.label, self.path = label, os.path.abspath(path)
        if not os.access(self.path, os.X_OK):
            sys.exit(f"{label}: no executable at {path}")
        with open(self.path, "rb") as f:
            self.sha = hashlib.sha256(f.read()).hexdigest()[:16]
        self.version = out([self.path, "--version"])
        d = os.path.dirname(self.path)
        self.git = out(["git", "-C", d, "rev-parse", "--short", "HEAD"])
        self.built = datetime.datetime.fromtimestamp(os.path.getmtime(self.path), datetime.timezone.utc)

    def describe(self):
        git = f", git HEAD of its tree {self.git}" if self.git else ""
        return (f"`{shown_path(self.path)}` ({self.version or 'no --version'}{git}, built "
                f"{self.built.isoformat(timespec='seconds')}, sha256 {self.sha}...)")


def out(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return p.stdout.strip() or None if p.returncode == 0 else None
    except OSError:
        return None


class Master:
    """One arbiterd -w N with the built-in worker, on a fresh port and socket."""

    def __init__(self, sc, build, n, run, mode):
        self.sc, self.build, self.n = sc, build, n
        self.port = harness.free_port()
        stem = f"{build.label[0]}{mode}{n}r{run}-{self.port}"
        self.log = os.path.join(sc.workdir, stem + ".log")
        self.sock = os.path.join(sc.sockdir, stem + ".sock")
        self.argv = [build.path, "-w", str(n), "-b", f"127.0.0.1:{self.port}", "-t", str(sc.timeout),
                     "--control", self.sock] + extra_args(n, mode, sc.ttin_trials)
        self.popen = None
        self.pid = None
        self.t0 = None

    def start(self):
        self.t0 = time.monotonic()
        self.popen = PROCS.start(self.argv, self.log)
        self.pid = self.popen.pid
        return self

    def check_alive(self):
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.build.label} arbiterd exited with {self.popen.returncode}; see {self.log}")

    def stop(self):
        if self.popen is not None:
            PROCS.end_session(self.popen.pid, first=signal.SIGKILL, grace=20.0)
            self.popen = None

    def wait_booted(self, limit):
        """Seconds from launch until the status request shows N ready workers (N
        distinct ready pids of the current generation), each of them then seen
        blocked waiting for clients in /proc. Until the master has N children
        nothing is asked; then status is polled, at most one request in flight and
        a pause of max(5 ms, the last request's time) between requests, so the
        poller never takes more than about half of the master's time. The moment
        is when the reply that showed N ready was read."""
        deadline = self.t0 + limit
        polls = 0
        while time.monotonic() < deadline:
            self.check_alive()
            if len(all_children(self.pid)) < self.n:
                time.sleep(0.002)
                continue
            try:
                dt, data = raw_status(self.sock, timeout=30)
            except (OSError, RuntimeError):
                time.sleep(0.005)  # the socket may not be bound yet
                continue
            at = time.monotonic()
            polls += 1
            st = status_reply(data)
            if st["master"]["ready"] >= self.n:
                gen = st["master"]["generation"]
                pids = {w["pid"] for w in st["workers"] if w["state"] == "ready" and w["generation"] == gen}
                if len(pids) >= self.n and all(harness.waiting_for_clients(p) for p in pids):
                    return at - self.t0, polls
            time.sleep(max(0.005, dt))
        raise RuntimeError(f"{self.build.label} arbiterd -w {self.n}: not {self.n} ready after {limit:.0f}s; "
                           f"see {self.log}")


def extra_args(n, mode, ttins):
    """The flags beyond the common ones: a limit with room for N and the TTINs where
    the default one has not, and process groups for the `off` mode."""
    out = ["--max-workers", str(n + ttins)] if n + ttins > DEFAULT_MAX_WORKERS else []
    return out + (["--cgroup", "off"] if mode == "off" else [])


class Scale:
    def __init__(self, args):
        self.args = args
        self.ns = [int(x) for x in args.workers.split(",") if x.strip()]
        self.modes = [x.strip() for x in args.cgroup.split(",") if x.strip()]
        if not self.modes or any(m not in ("on", "off") for m in self.modes):
            sys.exit("--cgroup takes on, off or on,off")
        self.spaced = args.spaced
        self.top_secs = args.top_secs
        self.repeat = args.repeat
        self.timeout = args.timeout
        self.idle_secs = args.idle_secs
        self.reps = args.reps
        self.ttin_trials = args.ttin_trials
        self.ctl = os.path.abspath(args.ctl)
        if not os.access(self.ctl, os.X_OK):
            sys.exit(f"no executable arbiterctl at {args.ctl}")
        self.builds = [Build("baseline", args.baseline), Build("candidate", args.candidate)]
        os.makedirs(SCRATCH, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.workdir = tempfile.mkdtemp(prefix=f"scale-{stamp}-", dir=SCRATCH)
        # Unix socket paths are limited to 107 bytes: the sockets go in a short directory.
        self.sockdir = tempfile.mkdtemp(prefix="arbscale-")
        self.r = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "settings": {"workers": self.ns, "repeat": self.repeat, "timeout": self.timeout,
                               "idle_secs": self.idle_secs, "reps": self.reps, "ttin_trials": self.ttin_trials,
                               "cgroup": self.modes, "spaced": self.spaced, "top_secs": self.top_secs},
                  "builds": {b.label: {"path": b.path, "version": b.version, "sha256": b.sha, "git": b.git}
                             for b in self.builds},
                  "cells": {}, "errors": [], "loadavg": [], "cpu_pressure": {}}

    def cell(self, build, mode, n):
        return self.r["cells"].setdefault(build.label, {}).setdefault(f"{mode}/{n}", {
            "boot_secs": [], "status_polls": [], "idle": [], "fds": [], "rss_kib": [], "raw_status": [],
            "status_bytes": [], "arbiterctl": [], "arbiterctl_error": None, "ttin": [], "spaced_status": [],
            "top_cpu": []})

    def measure(self, build, n, run, mode):
        c = self.cell(build, mode, n)
        m = Master(self, build, n, run, mode).start()
        p0 = harness.cpu_pressure_us()
        t0 = time.monotonic()
        try:
            boot, polls = m.wait_booted(limit=max(60.0, n * 0.05))
            c["boot_secs"].append(boot)
            c["status_polls"].append(polls)
            harness.http_get(m.port)  # one worker answers

            # Idle: no connection open, nothing sent; settle, then the window.
            time.sleep(2.0)
            m.check_alive()
            pid = m.pid
            c0 = harness.cpu_secs(pid)
            v0 = harness.status_value(pid, "voluntary_ctxt_switches", True)
            n0 = harness.status_value(pid, "nonvoluntary_ctxt_switches", True)
            time.sleep(self.idle_secs)
            idle = {"secs": self.idle_secs,
                    "cpu_ms": (harness.cpu_secs(pid) - c0) * 1000,
                    "voluntary": harness.status_value(pid, "voluntary_ctxt_switches", True) - v0,
                    "nonvoluntary": harness.status_value(pid, "nonvoluntary_ctxt_switches", True) - n0}
            c["idle"].append(idle)
            c["fds"].append(len(os.listdir(f"/proc/{pid}/fd")))
            c["rss_kib"].append(harness.rss_kib(pid))
            m.check_alive()

            # Status: the raw request on a fresh connection each time, then arbiterctl.
            for i in range(self.reps):
                dt, data = raw_status(m.sock)
                c["raw_status"].append(dt)
                if i == 0:
                    st = status_reply(data)
                    if len(st["workers"]) < n:
                        raise RuntimeError(f"status lists {len(st['workers'])} workers, not {n}")
                    c["status_bytes"].append(len(data))
            argv = [self.ctl, "--control", m.sock, "status", "--json"]
            for _ in range(self.reps if c["arbiterctl_error"] is None else 0):
                t = time.perf_counter()
                p = subprocess.run(argv, capture_output=True, timeout=60)
                dt = time.perf_counter() - t
                ok = p.returncode in (0, 4)  # 4: degraded, still a status
                if ok:
                    try:
                        doc = json.loads(p.stdout)
                        ok = "master" in doc or "master" in doc.get("reply", {})
                    except ValueError:
                        ok = False
                if not ok:
                    c["arbiterctl_error"] = (f"exit {p.returncode}: "
                                             f"{p.stderr.decode(errors='replace').strip()[:200]}")
                    log(f"   arbiterctl status --json failed at {n}: {c['arbiterctl_error']}")
                    break
                c["arbiterctl"].append(dt)

            # Status once a second, as `top` asks: each request finds the readings of
            # the previous one a second old.
            for i in range(self.spaced):
                time.sleep(1.05)
                c["spaced_status"].append(raw_status(m.sock)[0])

            # `arbiterctl top` (frames to a pipe, one status a second): the master's
            # CPU over the window, from its start (the first frame included).
            if self.top_secs > 0:
                time.sleep(2.0)
                c0, t0top = harness.cpu_secs(pid), time.monotonic()
                top = subprocess.Popen([self.ctl, "--control", m.sock, "top"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(self.top_secs)
                top.terminate()
                top.wait(timeout=10)
                c["top_cpu"].append((harness.cpu_secs(pid) - c0) / (time.monotonic() - t0top))
                m.check_alive()

            # TTIN: from the signal until a new child of the master is waiting for clients.
            for _ in range(self.ttin_trials):
                time.sleep(0.3)
                before = set(all_children(pid))
                t = time.monotonic()
                os.kill(pid, signal.SIGTTIN)
                while True:
                    new = [k for k in all_children(pid) if k not in before]
                    if any(harness.waiting_for_clients(k) for k in new):
                        c["ttin"].append(time.monotonic() - t)
                        break
                    if time.monotonic() - t > 10:
                        raise RuntimeError("no new worker serving 10 s after TTIN")
                    time.sleep(0.0003)
            log(f"   run {run + 1} {build.label} --cgroup {mode} -w {n}: boot {boot * 1000:.0f} ms ({boot / n * 1e6:.0f} us/worker, "
                f"{polls} polls), idle {idle['voluntary']}+{idle['nonvoluntary']} switches "
                f"{idle['cpu_ms']:.2f} ms CPU, fds {c['fds'][-1]}, raw status "
                f"{median(c['raw_status'][-self.reps:]) * 1000:.2f} ms, arbiterctl "
                + (f"{median(c['arbiterctl'][-self.reps:]) * 1000:.2f} ms" if c["arbiterctl_error"] is None
                   else "failed")
                + (f", status 1 s apart {median(c['spaced_status'][-self.spaced:]) * 1000:.2f} ms"
                   if self.spaced else "")
                + (f", top {c['top_cpu'][-1] * 100:.2f}% CPU" if self.top_secs > 0 else "")
                + f", TTIN {median(c['ttin'][-self.ttin_trials:]) * 1000:.2f} ms")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # written down in the report, never turned into a number
            self.r["errors"].append(f"run {run + 1}, {build.label}, --cgroup {mode}, N = {n}: "
                                    f"{type(e).__name__}: {e}")
            log(f"   run {run + 1} {build.label} --cgroup {mode} -w {n} FAILED: {e}")
            traceback.print_exc()
        finally:
            m.stop()
            p1 = harness.cpu_pressure_us()
            if p0 is not None and p1 is not None:
                self.r["cpu_pressure"].setdefault(build.label, []).append(
                    (p1 - p0) / 1e6 / max(1e-9, time.monotonic() - t0))

    def run(self):
        for run in range(self.repeat):
            with open("/proc/loadavg") as f:
                self.r["loadavg"].append(float(f.read().split()[0]))
            for mode in self.modes:
                for n in self.ns:
                    order = self.builds if run % 2 == 0 else self.builds[::-1]
                    for b in order:
                        self.measure(b, n, run, mode)


# ---------------------------------------------------------------- report


def ms(x, d=2):
    return "-" if x is None else f"{x * 1000:.{d}f} ms"


def ratio(a, b):
    if a is None or b is None:
        return "-"
    if a == 0:
        return "both 0" if b == 0 else "-"
    return f"{b / a:.2f}x"


def each(xs, fmt):
    return ", ".join(fmt(x) for x in xs)


MODE_TITLE = {
    "on": "cgroups and guardian (the default where a cgroup v2 hierarchy is writable)",
    "off": "`--cgroup off` (process groups, the guardian still on)",
}


def report(sc, command, section):
    r = sc.r
    base, cand = sc.builds
    L = []
    w = L.append
    w(section)
    w("")
    w(f"Produced by `bench/scale.py` on {r['started']} ({os.cpu_count()} CPUs, kernel {platform.release()}; "
      f"{r['settings']['repeat']} run(s); in each run, for each containment mode and each N, both builds one "
      "after the other, the order alternating between runs, one master at a time). Medians over the runs; the "
      "status and TTIN medians are over every request of every run.")
    w("")
    w(f"- baseline: {base.describe()}")
    w(f"- candidate: {cand.describe()}")
    w(f"- client: `{shown_path(sc.ctl)}`; every master: `arbiterd -w N -b 127.0.0.1:$PORT -t {sc.timeout} "
      f"--control $SOCK` (plus `--max-workers N+{sc.ttin_trials}` where that is above {DEFAULT_MAX_WORKERS}, "
      "room for the TTINs, and `--cgroup off` in that mode), the built-in worker")
    la = ", ".join(f"{x:.2f}" for x in r["loadavg"])
    psi = "; ".join(f"{k} {each(v, lambda x: f'{x * 100:.0f}%')}" for k, v in r["cpu_pressure"].items())
    w(f"- noise: 1-minute load average at the start of each run: {la}; CPU pressure (PSI `some`) while each "
      f"master was measured: {psi}")
    w("")
    w("**Boot**: from the launch until the raw status request shows N ready workers (N distinct ready pids), "
      "each then seen blocked waiting for clients in `/proc/PID/syscall`; status is asked only once the "
      "master has N children, then polled with a pause of max(5 ms, the last request's time). **Idle**: after "
      f"boot and 2 s of settling, no connection open, the master's voluntary context switches (each is one "
      f"sleep, so one wakeup) and involuntary ones, summed over its threads from `/proc/PID/task/*/status`, "
      f"and its CPU time from `/proc/PID/task/*/schedstat`, over {sc.idle_secs:g} s. **fds**: "
      "`ls /proc/PID/fd | wc -l` after the idle window. **Raw status**: `{\"v\":1,\"cmd\":\"status\"}` on "
      f"a fresh connection, from connect to the whole reply line read (not parsed), {sc.reps} back to back "
      f"per master, then {sc.spaced} one every 1.05 s (each finds the previous one's readings a second old); "
      f"**arbiterctl**: wall time of `arbiterctl --control $SOCK status --json`, {sc.reps} per master. "
      f"**top**: the master's CPU time (schedstat) over {sc.top_secs:g} s of `arbiterctl --control $SOCK top` "
      "writing its frames (one status a second) to a pipe, in percent of one core, from 2 s after the last "
      "request (its first frame included). **TTIN**: from SIGTTIN to the master until a new child of it is "
      f"blocked waiting for clients (polled every 0.3 ms), {sc.ttin_trials} per master, 0.3 s apart, at N "
      "workers.")
    w("")
    cells = r["cells"]

    def get(b, mode, n, k):
        return cells.get(b.label, {}).get(f"{mode}/{n}", {}).get(k, [])

    lo, hi = min(sc.ns), max(sc.ns)

    def per_worker(b, mode, n):
        v = median(get(b, mode, n, "boot_secs"))
        return None if v is None else v / n

    def verdict(ok):
        return "" if ok is None else (" (met)" if ok else " (not met)")

    for mode in sc.modes:
        w(f"### {MODE_TITLE[mode]}")
        w("")
        w("| N | figure | baseline | candidate | candidate / baseline | each run: baseline; candidate |")
        w("|---|---|---|---|---|---|")
        for n in sc.ns:
            def row(name, key, f, fmt, per_run=True):
                vb = [f(x) for x in get(base, mode, n, key)]
                vc = [f(x) for x in get(cand, mode, n, key)]
                mb, mc = median(vb), median(vc)
                runs = "" if not per_run else f"{each(vb, fmt)}; {each(vc, fmt)}"
                w(f"| {n} | {name} | {fmt(mb) if mb is not None else '-'} | "
                  f"{fmt(mc) if mc is not None else '-'} | {ratio(mb, mc)} | {runs} |")
            row("boot, total", "boot_secs", lambda x: x, lambda x: ms(x, 0))
            row("boot, per worker", "boot_secs", lambda x, n=n: x / n, lambda x: f"{x * 1e6:.0f} us")
            row(f"idle wakeups in {sc.idle_secs:g} s (voluntary switches)", "idle", lambda d: d["voluntary"],
                lambda x: f"{x:g}")
            row(f"idle involuntary switches in {sc.idle_secs:g} s", "idle", lambda d: d["nonvoluntary"],
                lambda x: f"{x:g}")
            row(f"idle CPU time in {sc.idle_secs:g} s", "idle", lambda d: d["cpu_ms"] / 1000, lambda x: ms(x, 2))
            row("master fds", "fds", lambda x: x, lambda x: f"{x:g}")
            row("master RSS", "rss_kib", lambda x: x, lambda x: f"{x / 1024:.2f} MiB")
            row("raw status, back to back, median", "raw_status", lambda x: x, lambda x: ms(x, 2), per_run=False)
            if sc.spaced:
                row("raw status, one a second, median", "spaced_status", lambda x: x, lambda x: ms(x, 2),
                    per_run=False)
            row("status reply size", "status_bytes", lambda x: x, lambda x: f"{x / 1024:.0f} KiB", per_run=False)
            for b in (base, cand):
                e = cells.get(b.label, {}).get(f"{mode}/{n}", {}).get("arbiterctl_error")
                if e:
                    w(f"| {n} | `arbiterctl status --json` ({b.label}) | failed: {e.replace('|', '/')} | | | |")
            row("`arbiterctl status --json`, median", "arbiterctl", lambda x: x, lambda x: ms(x, 2),
                per_run=False)
            if sc.top_secs > 0:
                row("master CPU under `arbiterctl top`", "top_cpu", lambda x: x, lambda x: f"{x * 100:.2f}%")
            row("TTIN to serving, median", "ttin", lambda x: x, lambda x: ms(x, 2), per_run=False)
        w("")

        # Targets, as the issue states them.
        w("| target | baseline | candidate |")
        w("|---|---|---|")
        if lo != hi:
            figs = []
            for b in (base, cand):
                a, z = per_worker(b, mode, lo), per_worker(b, mode, hi)
                ok = None if a is None or z is None else z <= 1.1 * a
                figs.append(f"{'-' if z is None else f'{z * 1e6:.0f} us'} vs "
                            f"{'-' if a is None else f'{a * 1e6:.0f} us'}"
                            f"{'' if a is None or z is None else f' ({z / a:.2f}x)'}{verdict(ok)}")
            w(f"| per-worker boot at {hi} at most 1.1x that at {lo} | {figs[0]} | {figs[1]} |")
        for key, what in (("raw_status", "back to back"), ("spaced_status", "one a second")):
            if key == "spaced_status" and not sc.spaced:
                continue
            figs = []
            for b in (base, cand):
                v = median(get(b, mode, hi, key))
                figs.append(f"{ms(v)}{verdict(None if v is None else v <= 0.020)}")
            w(f"| raw status at {hi} workers at most 20 ms, {what} | {figs[0]} | {figs[1]} |")
        if sc.top_secs > 0:
            figs = []
            for b in (base, cand):
                v = median(get(b, mode, hi, "top_cpu"))
                figs.append("-" if v is None else f"{v * 100:.2f}%")
            w(f"| master CPU under `top` at {hi} workers (a few percent) | {figs[0]} | {figs[1]} |")
        for n in sc.ns:
            figs = []
            for b in (base, cand):
                v = [d["voluntary"] for d in get(b, mode, n, "idle")]
                figs.append(f"{'-' if not v else ', '.join(map(str, v))}{verdict(None if not v else max(v) == 0)}")
            w(f"| no idle wakeups at {n} workers (each run) | {figs[0]} | {figs[1]} |")
        w("")
    if r["errors"]:
        w("What failed: " + "; ".join(e.replace("|", "/") for e in r["errors"]))
        w("")
    took = r["took_secs"]
    w(f"Reproduce (from the repository root; it took {took / 60:.1f} min here):")
    w("")
    w(f"    {command}")
    w("")
    return "\n".join(L)


def write_section(path, text, section=SECTION):
    """Replace the section (its heading up to the next `## ` heading or the end) or
    append it at the end: after bench/run.py's kept-marker, so run.py keeps it."""
    with open(path) as f:
        old = f.read()
    lines = old.split("\n")
    start = next((i for i, l in enumerate(lines) if l.strip() == section), None)
    body = text.rstrip("\n").split("\n")
    if start is None:
        new = old.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = lines[end:]
        new = "\n".join(lines[:start] + body + ([""] + tail if tail else [""]))
    with open(path, "w") as f:
        f.write(new)


def main():
    global PROCS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="arbiterd before the change")
    ap.add_argument("--candidate", required=True, help="arbiterd after the change")
    ap.add_argument("--ctl", required=True, help="arbiterctl, used against both")
    ap.add_argument("--workers", default="1024,4096", help="comma-separated N (default 1024,4096)")
    ap.add_argument("--repeat", type=int, default=3, help="runs (default 3)")
    ap.add_argument("--timeout", type=int, default=30, help="arbiterd -t (default 30, as bench/run.py)")
    ap.add_argument("--idle-secs", type=float, default=10, help="idle window (default 10)")
    ap.add_argument("--reps", type=int, default=20, help="status requests per master, each client (default 20)")
    ap.add_argument("--ttin-trials", type=int, default=5, help="TTINs per master (default 5)")
    ap.add_argument("--cgroup", default="on", help="containment modes: on, off or on,off (default on)")
    ap.add_argument("--spaced", type=int, default=10, help="status requests one a second per master (default 10)")
    ap.add_argument("--top-secs", type=float, default=10, help="arbiterctl top window, 0 for none (default 10)")
    ap.add_argument("--section", default=SECTION, help=f"the heading --write replaces (default {SECTION!r})")
    ap.add_argument("--write", action="store_true", help=f"put the table into {shown_path(RESULTS)}")
    ap.add_argument("--results", default=RESULTS, help="the file --write edits (default bench/RESULTS.md)")
    args = ap.parse_args()

    # The command that reproduces this run, as the report shows it.
    cmd = ["python3", "bench/scale.py", "--baseline", shown_path(args.baseline), "--ctl", shown_path(args.ctl),
           "--candidate", shown_path(args.candidate), "--workers", args.workers, "--repeat", str(args.repeat)]
    for opt, default in (("timeout", 30), ("idle_secs", 10), ("reps", 20), ("ttin_trials", 5), ("spaced", 10),
                         ("top_secs", 10)):
        if getattr(args, opt) != default:
            cmd += ["--" + opt.replace("_", "-"), f"{getattr(args, opt):g}"]
    for opt, default in (("cgroup", "on"), ("section", SECTION)):
        if getattr(args, opt) != default:
            cmd += ["--" + opt, getattr(args, opt)]
    command = shlex.join(cmd + ["--write"])

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * max(int(x) for x in args.workers.split(",")) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
        if hard < need:
            log(f"RLIMIT_NOFILE hard limit {hard} is below the ~{need} fds the largest master may need")

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    sc = Scale(args)
    PROCS = harness.Processes()
    harness.PROCS = PROCS
    log(f"scratch: {shown_path(sc.workdir)}; sockets: {sc.sockdir}")
    t = time.monotonic()
    try:
        sc.run()
    except KeyboardInterrupt:
        log("interrupted; killing every process started")
        PROCS.cleanup()
        shutil.rmtree(sc.sockdir, ignore_errors=True)
        sys.exit(130)
    finally:
        PROCS.cleanup()
        shutil.rmtree(sc.sockdir, ignore_errors=True)
    sc.r["took_secs"] = time.monotonic() - t
    with open(os.path.join(sc.workdir, "results.json"), "w") as f:
        json.dump(sc.r, f, indent=1)
    text = report(sc, command, args.section)
    with open(os.path.join(sc.workdir, "scale.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if args.write:
        write_section(args.results, text, args.section)
        log(f"wrote the section into {args.results}")
    log(f"done in {sc.r['took_secs']:.0f} s; raw data in {shown_path(sc.workdir)}/results.json")
    if sc.r["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""arbiterd against gunicorn, on this machine. Run it through bench/run.sh.

Every figure is measured here, now; what cannot be measured is written down as
such. See bench/README.md for what is measured and how. Stdlib only (gunicorn is
run from bench/.venv; it is never imported here).
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ARBITERD = os.path.join(ROOT, "target", "release", "arbiterd")
ARBITERCTL = os.path.join(ROOT, "target", "release", "arbiterctl")
VENV = os.path.join(BENCH, ".venv")
GUNICORN = os.path.join(VENV, "bin", "gunicorn")
GUNICORNC = os.path.join(VENV, "bin", "gunicornc")
SCRATCH = os.path.join(BENCH, ".work")
FLOOR = os.path.join(SCRATCH, "floor")
CWORKER = os.path.join(SCRATCH, "cworker")
WRK = "wrk"

# x86_64 syscall numbers a serving worker sleeps in: poll, select, accept, epoll_wait,
# pselect6, ppoll, epoll_pwait, accept4, epoll_pwait2. gunicorn's sync worker waits in
# pselect6 on its listener; the built-in worker in epoll_wait.
WAITING_FOR_CLIENTS = {7, 23, 43, 232, 270, 271, 281, 288, 441}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- /proc


def stat_fields(pid):
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def alive(pid):
    f = stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def children(pid):
    """Live children of a process (from /proc/PID/task/PID/children)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def waiting_for_clients(pid):
    """Has this process reached its serving loop: some thread blocked in accept/poll?"""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                first = f.read().split(" ", 1)[0]
        except OSError:
            continue
        if first.isdigit() and int(first) in WAITING_FOR_CLIENTS:
            return True
    return False


def status_value(pid, key, all_threads=False):
    """An integer field of /proc/PID/status (summed over threads if asked)."""
    paths = [f"/proc/{pid}/status"]
    if all_threads:
        paths = [f"/proc/{pid}/task/{t}/status" for t in os.listdir(f"/proc/{pid}/task")]
    total = 0
    for p in paths:
        with open(p) as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def rss_kib(pid):
    return status_value(pid, "VmRSS")


def cpu_secs(pid):
    """CPU time of all the process's threads, in seconds (schedstat: nanoseconds)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def session_pids(sid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = stat_fields(int(d))
            if f is not None and int(f[3]) == sid:
                out.append(int(d))
    return out


# ---------------------------------------------------------------- processes


class Processes:
    """Every process the harness starts leads a new session; cleanup kills whole
    sessions (a worker leading its own process group stays in its master's session,
    and so does a master started by an upgrade). The harness is a child subreaper, so
    orphans come back to it and are reaped here."""

    def __init__(self):
        self.sessions = set()
        self.popens = {}
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    def _child_setup(self):
        # In the child before exec: die with the harness even if it is SIGKILLed.
        self.libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    def start(self, argv, log_path, env=None):
        logf = open(log_path, "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env, cwd=BENCH, preexec_fn=self._child_setup)
        logf.close()
        self.sessions.add(p.pid)
        self.popens[p.pid] = p
        return p

    def reap(self):
        for p in self.popens.values():
            p.poll()
        me = str(os.getpid())
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in self.popens:
                f = stat_fields(int(d))
                if f and f[1] == me and f[0] == "Z":
                    try:
                        os.waitpid(int(d), os.WNOHANG)
                    except ChildProcessError:
                        pass

    def end_session(self, sid, first=signal.SIGTERM, grace=10.0):
        """Send `first` to every process of the session, wait for them all to go,
        SIGKILL what is left."""
        start = time.monotonic()
        for p in session_pids(sid):
            try:
                os.kill(p, first)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.reap()
            if not [p for p in session_pids(sid) if alive(p)]:
                break
            time.sleep(0.05)
        for p in session_pids(sid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while session_pids(sid) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        left = session_pids(sid)
        if left or time.monotonic() - start > 2:
            log(f"   (teardown of session {sid} took {time.monotonic() - start:.1f}s; left: "
                f"{[(p, (stat_fields(p) or ['?'])[0:2]) for p in left]})")
        self.sessions.discard(sid)

    def cleanup(self):
        for sid in list(self.sessions):
            for p in session_pids(sid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
        for sid in list(self.sessions):
            deadline = time.monotonic() + 5
            while session_pids(sid) and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.02)
        self.sessions.clear()


PROCS = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path="/", timeout=2.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------- control clients


class Ctl:
    """arbiterd's control protocol (docs/protocol.md): one JSON line each way."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.buf = b""

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def call(self, req, timeout=30.0):
        for attempt in range(2):
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.settimeout(timeout)
                    self.sock.connect(self.path)
                self.sock.settimeout(timeout)
                self.sock.sendall(json.dumps({"v": 1, **req}).encode() + b"\n")
                while b"\n" not in self.buf:
                    chunk = self.sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError("control socket closed")
                    self.buf += chunk
                line, self.buf = self.buf.split(b"\n", 1)
                return json.loads(line)
            except (OSError, ValueError):
                self.close()
                if attempt:
                    raise
        return None

    def status(self):
        try:
            r = self.call({"cmd": "status"}, timeout=5)
        except OSError:
            return None
        return r["reply"] if r and r.get("ok") else None

    def ping(self):
        r = self.call({"cmd": "ping"}, timeout=5)
        return r["reply"] if r and r.get("ok") else None


def ctl_once(path, req, timeout=60.0):
    c = Ctl(path)
    try:
        return c.call(req, timeout)
    finally:
        c.close()


def gunicorn_ctl_once(path, command, args=(), parse=True):
    """gunicorn's control socket: 4-byte big-endian length, then JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        body = json.dumps({"id": 1, "command": command, "args": list(args)}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        head = b""
        while len(head) < 4:
            head += s.recv(4 - len(head))
        (n,) = struct.unpack(">I", head)
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return json.loads(data) if parse else data


def ready_pids(st):
    """Distinct pids of ready workers of the current generation, from a status snapshot."""
    gen = st["master"]["generation"]
    return {w["pid"] for w in st["workers"] if w["state"] == "ready" and w["generation"] == gen}


# ---------------------------------------------------------------- servers under test


class Server:
    """One running master (arbiterd or gunicorn) with N workers on a fresh port."""

    def __init__(self, bench, kind, n, timeout=30, tag="", worker=None):
        self.bench, self.kind, self.n, self.timeout = bench, kind, n, timeout
        worker = worker or bench.worker
        self.port = free_port()
        stem = f"{kind[0]}{n}t{timeout}{tag}-{self.port}"
        self.dir = bench.workdir
        self.log = os.path.join(self.dir, stem + ".log")
        self.ctl_path = os.path.join(self.dir, stem + ".sock")
        self.pidfile = os.path.join(self.dir, stem + ".pid")
        if kind == "arbiterd":
            self.argv = [ARBITERD, "-w", str(n), "-b", f"127.0.0.1:{self.port}", "-t", str(timeout),
                         "--control", self.ctl_path, "-p", self.pidfile]
            if worker == "c":
                self.argv += ["--ready", "notify", "--", CWORKER]
        else:
            self.argv = [GUNICORN, "-w", str(n), "-b", f"127.0.0.1:{self.port}", "-k", "sync",
                         "-t", str(timeout), "--control-socket", self.ctl_path, "-p", self.pidfile,
                         "gunicorn_app:app"]
        shown = ["$N" if bench.current == "boot" and prev == "-w" else a
                 for prev, a in zip([None] + self.argv, self.argv)]
        bench.record(f"{kind}{' + cworker' if kind == 'arbiterd' and worker == 'c' else ''} "
                     f"({bench.current}{', choosing the upgrade method' if tag == 'up' else ''})", shown, self.port)
        self.ctl = Ctl(self.ctl_path) if kind == "arbiterd" else None
        self.popen = None
        self.master = None
        self.t0 = None

    def start(self):
        self.t0 = time.monotonic()
        self.popen = PROCS.start(self.argv, self.log)
        self.master = self.popen.pid
        return self

    def workers(self):
        return children(self.master)

    def wait_ready(self, limit=120.0, poll=0.002):
        """Seconds from launch until N distinct worker pids are serving.

        arbiterd: its status says ready == N with N distinct ready pids (the same
        request `arbiterctl status --json` sends), and each of those pids has been
        seen blocked waiting for clients. gunicorn: N of the master's children have
        been seen blocked waiting for clients (/proc/PID/syscall), which the sync
        worker reaches only after loading the app."""
        deadline = self.t0 + limit
        serving = set()
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.popen.returncode}; see {self.log}")
            if self.kind == "arbiterd":
                st = self.ctl.status()
                if st and st["master"]["ready"] >= self.n:
                    pids = ready_pids(st)
                    serving &= pids
                    serving.update(p for p in pids - serving if waiting_for_clients(p))
                    if len(serving) >= self.n:
                        return time.monotonic() - self.t0
            else:
                kids = set(self.workers())
                serving &= kids
                for k in kids - serving:
                    if waiting_for_clients(k):
                        serving.add(k)
                if len(serving) >= self.n:
                    return time.monotonic() - self.t0
            time.sleep(poll)
        raise RuntimeError(f"{self.kind} -w {self.n} not serving after {limit:.0f}s; see {self.log}")

    def check_answers(self):
        r = http_get(self.port)
        if "pid" not in r:
            raise RuntimeError(f"unexpected answer {r}")
        return r

    def stop(self):
        """Tear down: SIGKILL to every process of the session (a graceful stop is not
        what is measured, and 1024 gunicorn workers take seconds to quit)."""
        if self.ctl:
            self.ctl.close()
        if self.popen is not None:
            PROCS.end_session(self.popen.pid, first=signal.SIGKILL)
            self.popen = None


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (1 if self.quick else 3)
        self.ns = [4, 64, 256] if self.quick else [4, 64, 256, 1024]
        self.gunicorn_max = args.gunicorn_max if args.gunicorn_max is not None else (64 if self.quick else 1024)
        self.idle_secs = 5 if self.quick else 30
        self.load_secs = 6 if self.quick else 20
        self.every = 2
        self.reps = 3 if self.quick else 10
        self.scale_trials = 2 if self.quick else 5
        self.timeout_trials = 1 if self.quick else 2
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.workdir = os.path.join(SCRATCH, "run-" + stamp)
        os.makedirs(self.workdir, exist_ok=True)
        self.commands = {}
        self.current = ""
        self.r = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "mode": "quick" if self.quick else "full", "runs": self.runs, "errors": {}}
        self.worker = args.worker
        self.arbiterctl = False
        self.has_wrk = bool(shutil.which(WRK))

    # -- helpers

    def record(self, what, argv, port=None):
        """Keep each distinct command line for the report, with the run's scratch
        directory as $RUN and the port as $PORT, and what it was used for."""
        if self.current == "probe":
            return
        def t(a):
            a = rel(str(a).replace(self.workdir, "$RUN"))
            return a.replace(str(port), "$PORT") if port else a
        line = " ".join(a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else shlex.quote(a) for a in map(t, argv))
        uses = self.commands.setdefault(line, [])
        if what not in uses:
            uses.append(what)

    def section(self, name, fn):
        self.current = name
        with open("/proc/loadavg") as f:
            self.r.setdefault("loadavg", {})[name] = f.read().split()[0]
        log(f"== {name} (load average {self.r['loadavg'][name]})")
        t = time.monotonic()
        p0 = cpu_pressure_us()
        try:
            fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded in RESULTS.md, never turned into a number
            self.r["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED: {e}")
            traceback.print_exc()
        took = time.monotonic() - t
        p1 = cpu_pressure_us()
        if p0 is not None and p1 is not None:
            # Share of the section's wall time during which some runnable task waited for a CPU.
            self.r.setdefault("cpu_pressure", {})[name] = (p1 - p0) / 1e6 / took
        log(f"   {name} took {took:.1f}s")

    # -- setup

    def probe(self):
        """Which worker arbiterd runs, and whether arbiterctl answers."""
        self.current = "probe"
        m = self.r["machine"] = machine()
        log(f"machine: {m['cpu']} x{m['nproc']}, {m['mem_gib']:.1f} GiB, kernel {m['kernel']}")
        if self.worker in ("auto", "builtin"):
            s = Server(self, "arbiterd", 2, tag="probe").start()
            why = None
            try:
                s.wait_ready(limit=10)
                r = s.check_answers()
                if not {"pid", "worker_id", "slot", "generation"} <= set(r):
                    why = f"answers {r}"
            except Exception as e:
                why = str(e)
            finally:
                s.stop()
            if why is None:
                self.worker = "builtin"
            elif self.worker == "builtin":
                raise SystemExit(f"the built-in worker does not serve: {why}")
            else:
                log(f"built-in worker does not serve ({why}); falling back to bench/cworker.c")
                self.r["builtin_problem"] = why
                self.worker = "c"
        self.r["worker"] = self.worker
        s = Server(self, "arbiterd", 2, tag="probe").start()
        try:
            s.wait_ready(limit=10)
            out = subprocess.run([ARBITERCTL, "--control", s.ctl_path, "status", "--json"],
                                 capture_output=True, text=True, timeout=10)
            try:
                doc = json.loads(out.stdout)
                self.arbiterctl = "master" in doc or "master" in doc.get("reply", {})
            except ValueError:
                self.arbiterctl = False
            if not self.arbiterctl:
                self.r["arbiterctl_problem"] = (f"`arbiterctl status --json` exited {out.returncode}, "
                                                f"stdout {out.stdout[:80]!r}, stderr {out.stderr[:120]!r}")
        finally:
            s.stop()
        self.r["arbiterctl"] = self.arbiterctl
        log(f"arbiterd worker: {self.worker}; arbiterctl works: {self.arbiterctl}; wrk: {self.has_wrk}")
        if self.has_wrk:
            self.r["wrk_version"] = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.split("\n")[0]

    # -- experiments

    def floor_boot(self, n):
        """`floor boot N`, measured beside each boot (same machine state)."""
        d = json.loads(subprocess.check_output([FLOOR, "boot", str(n)]))
        self.r.setdefault("floor", {}).setdefault("boot", {}).setdefault(str(n), []).append(d["secs"])
        return d["secs"]

    def floor_seq(self):
        """`floor seq 300`, measured beside each run of the scale section."""
        d = json.loads(subprocess.check_output([FLOOR, "seq", "300"]))
        self.r.setdefault("floor", {}).setdefault("seq_us", []).append(d["median_us"])
        return d["median_us"]

    def boot(self):
        out = self.r["boot"] = {"arbiterd": {}, "gunicorn": {}}
        rss = self.r["rss_kib"] = {"arbiterd": {}, "gunicorn": {}}
        ctl = self.r["control"] = {}
        for run in range(self.runs):
            for n in self.ns:
                self.record("floor", [FLOOR, "boot", "$N"])
                log(f"   run {run+1} floor boot {n}: {self.floor_boot(n) * 1000:.0f} ms")
                order = ["arbiterd", "gunicorn"] if run % 2 == 0 else ["gunicorn", "arbiterd"]
                for kind in order:
                    if kind == "gunicorn" and n > self.gunicorn_max:
                        continue
                    s = Server(self, kind, n).start()
                    try:
                        t = s.wait_ready(limit=60 if kind == "arbiterd" else 240,
                                         poll=0.002 if n <= 64 else 0.005)
                        s.check_answers()
                        out[kind].setdefault(str(n), []).append(t)
                        time.sleep(1.0)
                        rss[kind].setdefault(str(n), []).append(rss_kib(s.master))
                        log(f"   run {run+1} {kind} -w {n}: serving after {t*1000:.0f} ms, "
                            f"master RSS {rss_kib(s.master)} KiB")
                        if n in (64, 1024):
                            self.control_latency(s, ctl.setdefault(str(n), {}))
                    finally:
                        s.stop()

    def timed(self, argv, reps):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            p = subprocess.run(argv, capture_output=True, timeout=30)
            ts.append(time.perf_counter() - t)
            if p.returncode != 0:
                raise RuntimeError(f"{shlex.join(argv)} exited {p.returncode}: {p.stderr[:200]!r}")
        return ts

    def control_latency(self, s, into):
        reps = self.reps
        if s.kind == "arbiterd":
            if self.arbiterctl:
                argv = [ARBITERCTL, "--control", s.ctl_path, "status", "--json"]
                self.record("arbiterctl status", argv, s.port)
                into.setdefault("arbiterctl status --json", []).extend(self.timed(argv, reps))
            raw = into.setdefault("arbiterd raw status request (connect, send, whole answer read; not parsed)", [])
            for _ in range(reps):
                t = time.perf_counter()
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                    c.settimeout(10)
                    c.connect(s.ctl_path)
                    c.sendall(b'{"v":1,"cmd":"status"}\n')
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = c.recv(1 << 20)
                        if not chunk:
                            raise RuntimeError("control socket closed before the answer")
                        buf += chunk
                raw.append(time.perf_counter() - t)
                if not buf.startswith(b'{"v":1,"ok":true'):
                    raise RuntimeError(f"status answered {buf[:200]!r}")
        else:
            if os.path.exists(GUNICORNC):
                argv = [GUNICORNC, "-s", s.ctl_path, "-c", "show workers", "-j"]
                self.record("gunicornc show workers", argv, s.port)
                into.setdefault("gunicornc -c 'show workers' -j", []).extend(self.timed(argv, reps))
            raw = into.setdefault("gunicorn raw 'show workers' request (connect, send, whole answer read; not parsed)", [])
            for _ in range(reps):
                t = time.perf_counter()
                gunicorn_ctl_once(s.ctl_path, "show", ["workers"], parse=False)
                raw.append(time.perf_counter() - t)

    def idle(self):
        """64 workers, nothing to do: the master's CPU time and voluntary context
        switches (its wakeups) over the window. The three masters idle side by side:
        the counters are per process, and nobody talks to them during the window."""
        out = self.r["idle"] = {}
        for run in range(self.runs):
            servers = [("arbiterd -t 30", Server(self, "arbiterd", 64, timeout=30)),
                       ("arbiterd -t 0", Server(self, "arbiterd", 64, timeout=0)),
                       ("gunicorn -t 30", Server(self, "gunicorn", 64, timeout=30))]
            try:
                for _, s in servers:
                    s.start().wait_ready()
                    if s.ctl:
                        s.ctl.close()  # no control connection open during the window
                time.sleep(3)
                before = {k: (cpu_secs(s.master), status_value(s.master, "voluntary_ctxt_switches", True),
                              status_value(s.master, "nonvoluntary_ctxt_switches", True)) for k, s in servers}
                time.sleep(self.idle_secs)
                for k, s in servers:
                    c0, v0, n0 = before[k]
                    d = {"cpu_ms": (cpu_secs(s.master) - c0) * 1000,
                         "voluntary": status_value(s.master, "voluntary_ctxt_switches", True) - v0,
                         "nonvoluntary": status_value(s.master, "nonvoluntary_ctxt_switches", True) - n0,
                         "secs": self.idle_secs}
                    out.setdefault(k, []).append(d)
                    log(f"   run {run+1} {k}: {d}")
            finally:
                for _, s in servers:
                    s.stop()

    def wait_new_worker(self, s, before, limit=10.0):
        """Seconds until a child of the master not in `before` is serving."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            for k in children(s.master):
                if k not in before and waiting_for_clients(k):
                    return k
            time.sleep(0.0003)
        raise RuntimeError(f"no new {s.kind} worker serving within {limit}s")

    def scale(self):
        out = self.r["scale"] = {}
        for run in range(self.runs):
            self.record("floor", [FLOOR, "seq", "300"])
            log(f"   run {run+1} floor seq: {self.floor_seq():.0f} us")
            for kind in ("arbiterd", "gunicorn"):
                s = Server(self, kind, 4).start()
                try:
                    s.wait_ready()
                    triggers = [("TTIN", lambda: os.kill(s.master, signal.SIGTTIN))]
                    if kind == "arbiterd":
                        if self.arbiterctl:
                            argv = [ARBITERCTL, "--control", s.ctl_path, "scale", "+1"]
                            self.record("arbiterctl scale +1", argv, s.port)
                            triggers.append(("arbiterctl scale +1",
                                             lambda a=argv: subprocess.Popen(a, stdout=subprocess.DEVNULL)))
                        triggers.append(("raw scale request by=1",
                                         lambda: ctl_once(s.ctl_path, {"cmd": "scale", "by": 1})))
                    elif os.path.exists(GUNICORNC):
                        argv = [GUNICORNC, "-s", s.ctl_path, "-c", "worker add 1"]
                        self.record("gunicornc worker add 1", argv, s.port)
                        triggers.append(("gunicornc worker add 1",
                                         lambda a=argv: subprocess.Popen(a, stdout=subprocess.DEVNULL)))
                    for name, trigger in triggers:
                        for _ in range(self.scale_trials):
                            time.sleep(0.3)
                            before = set(children(s.master))
                            t0 = time.monotonic()
                            p = trigger()
                            self.wait_new_worker(s, before)
                            dt = time.monotonic() - t0
                            if isinstance(p, subprocess.Popen):
                                p.wait(10)
                            out.setdefault(f"{kind} {name}", []).append(dt)
                    log(f"   run {run+1} {kind}: " + ", ".join(
                        f"{k.split(' ', 1)[1]} {out[k][-1]*1000:.1f} ms" for k in out if k.startswith(kind)))
                finally:
                    s.stop()

    # -- under load

    def wrk_argv(self, port, secs, keepalive):
        argv = [WRK, "-t", "2", "-c", "32", "-d", f"{secs}s", "--timeout", "2s"]
        if not keepalive:
            argv += ["-H", "Connection: close"]
        argv.append(f"http://127.0.0.1:{port}/")
        return argv

    def under_load(self, s, secs, action, keepalive=False):
        """Run wrk against the server for `secs`, calling action() every 2 s."""
        argv = self.wrk_argv(s.port, secs, keepalive)
        self.record(f"wrk ({'keep-alive' if keepalive else 'Connection: close'})", argv, s.port)
        outpath = os.path.join(self.workdir, f"wrk-{s.kind}-{s.port}-{time.monotonic():.0f}.txt")
        p = PROCS.start(argv, outpath)
        t0 = time.monotonic()
        actions = []
        i = 1
        try:
            while p.poll() is None:
                tick = t0 + self.every * i
                if tick > t0 + secs - 1.0:
                    break
                time.sleep(max(0.0, tick - time.monotonic()))
                a0 = time.monotonic()
                actions.append({"at": a0 - t0, **(action() or {}), "took": time.monotonic() - a0})
                i = max(i + 1, int((time.monotonic() - t0) / self.every) + 1)
            p.wait(secs + 30)
        finally:
            PROCS.end_session(p.pid, first=signal.SIGTERM)
        text = open(outpath).read()
        res = parse_wrk(text)
        res["actions"] = len(actions)
        res["action_log"] = actions
        return res

    def reload(self):
        if not self.has_wrk:
            self.r["errors"]["reload"] = "wrk is not installed (apt-get install -y wrk)"
            return
        out = self.r["reload"] = {}
        variants = [("arbiterd", False, None), ("gunicorn", False, None), ("arbiterd", True, None)]
        for run in range(self.runs):
            control = [("arbiterd", False, "c")] if run == 0 and self.worker != "c" else []
            for kind, ka, worker in variants + control:
                s = Server(self, kind, 4, worker=worker).start()
                try:
                    s.wait_ready()

                    def hup():
                        os.kill(s.master, signal.SIGHUP)
                    res = self.under_load(s, self.load_secs, hup, keepalive=ka)
                    if kind == "arbiterd":
                        st = s.ctl.status()
                        res["reloads_done"] = st["master"]["reloads"] if st else None
                        res["last_reload"] = st["master"]["last_reload"] if st else None
                    key = f"{kind} ({'keep-alive' if ka else 'Connection: close'})"
                    if worker == "c":
                        key = "control: arbiterd + bench/cworker.c (Connection: close, run 1 only)"
                    out.setdefault(key, []).append(res)
                    log(f"   run {run+1} {key}: {res['requests']} requests, {res['failures']} failed, "
                        f"{res['actions']} HUPs")
                finally:
                    s.stop()

    def upgrade_method(self):
        """How arbiterd is upgraded: arbiterctl upgrade, else the raw upgrade request,
        else USR2 then TERM to the old master. Tried once on a scratch instance."""
        s = Server(self, "arbiterd", 2, tag="up").start()
        try:
            s.wait_ready()
            methods = (["arbiterctl"] if self.arbiterctl else []) + ["request", "usr2"]
            for m in methods:
                try:
                    self.arbiterd_upgrade(s, m)
                    s.check_answers()
                    return m
                except Exception as e:
                    log(f"   upgrade by {m} does not work here: {e}")
                    self.r.setdefault("upgrade_problems", {})[m] = str(e)
            raise RuntimeError("no upgrade method works")
        finally:
            s.stop()

    def arbiterd_upgrade(self, s, method):
        old = s.master
        if method == "arbiterctl":
            argv = [ARBITERCTL, "--control", s.ctl_path, "upgrade"]
            self.record("arbiterctl upgrade", argv, s.port)
            p = subprocess.run(argv, capture_output=True, text=True, timeout=90)
            if p.returncode != 0:
                raise RuntimeError(f"arbiterctl upgrade exited {p.returncode}: {p.stderr.strip()[:200]}")
        elif method == "request":
            r = ctl_once(s.ctl_path, {"cmd": "upgrade"}, timeout=90)
            if not r or not r.get("ok"):
                raise RuntimeError(f"upgrade request answered {r}")
        else:
            os.kill(old, signal.SIGUSR2)
            new = wait_for(lambda: (p := read_pid(s.pidfile + ".2")) and p != old and p, 30,
                           "arbiterd PIDFILE.2")
            c = Ctl(s.ctl_path + ".2")
            try:
                wait_for(lambda: (st := c.status()) and st["master"]["ready"] >= s.n, 60,
                         "the new master's workers")
            finally:
                c.close()
            os.kill(old, signal.SIGTERM)
        wait_for(lambda: not alive(old), 60, "the old master to exit")
        wait_for(lambda: not os.path.exists(s.pidfile + ".2"), 30, "the new master to be promoted")
        s.ctl.close()
        new = wait_for(lambda: (p := s.ctl.ping()) and p["pid"] != old and p["pid"], 30,
                       "the new master on the control socket")
        s.master = new
        wait_for(lambda: (st := s.ctl.status()) and st["master"]["ready"] >= s.n, 30, "ready workers")

    def gunicorn_upgrade(self, s):
        old = s.master
        os.kill(old, signal.SIGUSR2)
        new = wait_for(lambda: (p := read_pid(s.pidfile + ".2")) and p != old and p, 30,
                       "gunicorn's PIDFILE.2")
        # Each of the new master's workers must have been seen serving: waiting for
        # clients in /proc, or answering one of our requests with its pid (under load
        # a sync worker goes from one connection to the next without ever waiting).
        seen = set()

        def all_seen():
            kids = set(children(new))
            seen.intersection_update(kids)
            seen.update(k for k in kids - seen if waiting_for_clients(k))
            if len(seen) < s.n:
                try:
                    pid = http_get(s.port)["pid"]
                    if pid in kids:
                        seen.add(pid)
                except (OSError, ValueError, KeyError):
                    pass
            return len(seen) >= s.n
        wait_for(all_seen, 60, "the new gunicorn master's workers")
        os.kill(old, signal.SIGTERM)
        wait_for(lambda: not alive(old), 60, "the old gunicorn master to exit")
        # Done once the new master has noticed and promoted itself (PIDFILE.2 renamed to
        # PIDFILE); before that it ignores USR2 ("Parent exists").
        wait_for(lambda: read_pid(s.pidfile) == new and not os.path.exists(s.pidfile + ".2"), 30,
                 "the new gunicorn master to be promoted")
        s.master = new

    def upgrade(self):
        if not self.has_wrk:
            self.r["errors"]["upgrade"] = "wrk is not installed (apt-get install -y wrk)"
            return
        method = self.upgrade_method()
        self.r["upgrade_method"] = method
        log(f"   arbiterd upgrade method: {method}")
        out = self.r["upgrade"] = {}
        for run in range(self.runs):
            control = [("arbiterd", "c")] if run == 0 and self.worker != "c" else []
            for kind, worker in [("arbiterd", None), ("gunicorn", None)] + control:
                s = Server(self, kind, 4, worker=worker).start()
                try:
                    s.wait_ready()

                    def up():
                        if kind == "arbiterd":
                            self.arbiterd_upgrade(s, method)
                        else:
                            self.gunicorn_upgrade(s)
                        return {"master": s.master}
                    res = self.under_load(s, self.load_secs, up)
                    s.check_answers()
                    key = "control: arbiterd + bench/cworker.c (run 1 only)" if worker == "c" else kind
                    out.setdefault(key, []).append(res)
                    log(f"   run {run+1} {key}: {res['requests']} requests, {res['failures']} failed, "
                        f"{res['actions']} upgrades (median {median([a['took'] for a in res['action_log']]) or 0:.2f}s)")
                finally:
                    s.stop()

    def timeouts(self):
        """-w 2 -t 2: SIGSTOP a worker (it stops beating), time until its
        replacement serves."""
        out = self.r["timeout"] = {}
        for run in range(self.runs):
            for kind in ("arbiterd", "gunicorn"):
                s = Server(self, kind, 2, timeout=2).start()
                victims = set()
                try:
                    s.wait_ready()
                    time.sleep(2.5)
                    for _ in range(self.timeout_trials):
                        before = set(children(s.master))
                        victim = sorted(before)[0]
                        victims.add(victim)
                        age = None
                        if kind == "arbiterd":
                            st = s.ctl.status()
                            age = next((w["last_beat_secs"] for w in st["workers"] if w["pid"] == victim), None)
                        else:
                            st = gunicorn_ctl_once(s.ctl_path, "show", ["workers"])
                            age = next((w["last_heartbeat"] for w in st["data"]["workers"] if w["pid"] == victim),
                                       None)
                        t0 = time.monotonic()
                        os.kill(victim, signal.SIGSTOP)
                        self.wait_new_worker(s, before, limit=30)
                        dt = time.monotonic() - t0
                        late = None if age is None else dt - (s.timeout - age)
                        out.setdefault(kind, []).append({"secs": dt, "beat_age_at_stop": age, "late": late})
                        log(f"   run {run+1} {kind}: replaced after {dt*1000:.0f} ms (beat age {age})")
                        wait_for(lambda: not alive(victim), 10, "the hung worker to be killed")
                        time.sleep(1.0)
                finally:
                    s.stop()
                # Workers that were timed out without being stopped: the master (or
                # the machine) stalled long enough for healthy workers to miss beats.
                with open(s.log, errors="replace") as f:
                    timed_out = {int(p) for p in re.findall(r"WORKER TIMEOUT \(pid:(\d+)\)", f.read())}
                out.setdefault(f"{kind} healthy workers timed out", []).append(len(timed_out - victims))


# ---------------------------------------------------------------- helpers


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def wait_for(fn, limit, what):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.005)
    raise RuntimeError(f"timed out after {limit}s waiting for {what}")


def parse_wrk(text):
    def num(pat, default=0):
        m = re.search(pat, text)
        return int(m.group(1)) if m else default
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if not m:
        raise RuntimeError(f"cannot read wrk output: {text[-300:]!r}")
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errs = dict(zip(("connect", "read", "write", "timeout"), map(int, se.groups()))) if se else \
        {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    non2xx = num(r"Non-2xx or 3xx responses: (\d+)")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return {"requests": int(m.group(1)), "socket_errors": errs, "non_2xx": non2xx,
            "failures": sum(errs.values()) + non2xx, "rps": float(rps.group(1)) if rps else None}


def cpu_pressure_us():
    """PSI: total microseconds some runnable task waited for a CPU (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024

    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            return None
    import hashlib
    with open(ARBITERD, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    built = datetime.datetime.fromtimestamp(os.path.getmtime(ARBITERD), datetime.timezone.utc)
    git = out(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", ROOT, "status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock"])
    return {"nproc": os.cpu_count(), "mem_gib": mem, "kernel": platform.release(), "cpu": cpu,
            "python": platform.python_version(),
            "gunicorn": out([os.path.join(VENV, "bin", "python"), "-c", "import gunicorn; print(gunicorn.__version__)"]),
            "arbiterd": out([ARBITERD, "--version"]),
            "rustc": out(["rustc", "--version"]),
            "git": git, "tree_dirty": bool(dirty), "arbiterd_sha256": sha,
            "arbiterd_built": built.isoformat(timespec="seconds")}


# ---------------------------------------------------------------- RESULTS.md


def ms(x, digits=1):
    return "n/a" if x is None else f"{x * 1000:.{digits}f} ms"


def ratio(a, b):
    """a / b as 'N.Nx', or n/a."""
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.1f}x"


def runs_note(xs):
    xs = [x for x in xs if x is not None]
    return f"{len(xs)} run{'s' if len(xs) != 1 else ''}"


def report(b):
    r = b.r
    m = r["machine"]
    L = []
    w = L.append
    w("# arbiterd vs gunicorn: benchmark results\n")
    w(f"Produced by `bench/run.sh{' --quick' if b.quick else ''}` on {r['started']} "
      f"({r['mode']} mode, medians of {r['runs']} run{'s' if r['runs'] > 1 else ''} unless a row says otherwise). "
      "Every number below was measured by that run; where something could not be measured the row says so.\n")
    w("## Machine\n")
    w(f"- CPU: {m['cpu']}, nproc = {m['nproc']}")
    w(f"- Memory: {m['mem_gib']:.1f} GiB; kernel {m['kernel']}")
    w(f"- arbiterd: `{m['arbiterd']}` (git {m['git']}{', with uncommitted changes in the tree' if m['tree_dirty'] else ''}), "
      f"{m['rustc']}, release build of {m['arbiterd_built']}, binary sha256 {m['arbiterd_sha256']}...")
    w(f"- gunicorn {m['gunicorn']} (sync worker, `bench/gunicorn_app.py`), Python {m['python']}")
    w(f"- load generator: {r.get('wrk_version') or 'wrk not installed'}")
    w("- the machine may be shared with builds and tests. 1-minute load average at the start of each section: "
      + ", ".join(f"{k} {v}" for k, v in r.get("loadavg", {}).items())
      + ("; CPU pressure during each section (PSI `some`: share of the time some runnable task waited for a "
         "CPU, harness and servers included): "
         + ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["cpu_pressure"].items()) if r.get("cpu_pressure") else ""))
    worker = r.get("worker")
    if worker == "builtin":
        w("- arbiterd workers: the built-in HTTP worker (`arbiterd` with no COMMAND)")
    else:
        w(f"- arbiterd workers: **not the built-in worker** (it did not serve: {r.get('builtin_problem')}); "
          "`bench/cworker.c`, a minimal C worker exec'd as COMMAND with `--ready notify`")
    if not r.get("arbiterctl"):
        w(f"- `arbiterctl` did not work in this build ({r.get('arbiterctl_problem')}): rows that need it say so; "
          "the same request sent on the control socket by the harness is shown beside them")
    w("")

    targets = []  # (target, figure, met)
    boot, fl = r.get("boot", {}), r.get("floor", {})
    w("## Boot: launch until N distinct workers serve\n")
    w("arbiterd: polled every 2-5 ms with the status request (`{\"v\":1,\"cmd\":\"status\"}`, what "
      "`arbiterctl status --json` sends): `ready == N` with N distinct ready pids, each of which has been "
      "seen blocked waiting for clients (`/proc/PID/syscall` in epoll_wait/poll/accept). gunicorn: N children of the "
      "master seen blocked waiting for clients (the sync worker reaches its `select` only after loading the app). "
      "Floor: `floor boot N` forks+execs N copies of a tiny C program that each write one byte once exec'd; "
      "it runs right before each arbiterd/gunicorn pair, so it sees the same machine.\n")
    w("| N | arbiterd | gunicorn | gunicorn / arbiterd | floor | arbiterd / floor |")
    w("|---|---|---|---|---|---|")
    for n in b.ns:
        a = median(boot.get("arbiterd", {}).get(str(n), []))
        g = median(boot.get("gunicorn", {}).get(str(n), []))
        f = median(fl.get("boot", {}).get(str(n), []))
        if n > b.gunicorn_max:
            gs = f"not run (capped at {b.gunicorn_max})"
        else:
            gs = ms(g, 0) + f" ({runs_note(boot.get('gunicorn', {}).get(str(n), []))})"
        w(f"| {n} | {ms(a)} ({runs_note(boot.get('arbiterd', {}).get(str(n), []))}) | {gs} | {ratio(g, a)} | {ms(f)} | {ratio(a, f)} |")
    a256 = median(boot.get("arbiterd", {}).get("256", []))
    targets.append(("256 built-in workers serving within 1 s of launch", ms(a256),
                    None if a256 is None else a256 <= 1.0))
    w("")
    w(f"gunicorn's master sleeps `0.1 * random()` s after each spawn (`Arbiter.spawn_workers`), about 50 ms "
      f"per worker on average, so its boot time grows by about N x 50 ms whatever the machine; it was run up to "
      f"N = {b.gunicorn_max} here"
      + (" (1024 sync workers fit in this machine's memory)." if b.gunicorn_max >= 1024 else ".") + "\n")

    w("## Master memory\n")
    rss = r.get("rss_kib", {})
    w("VmRSS of the master, 1 s after all N workers serve.\n")
    w("| N | arbiterd | gunicorn | gunicorn / arbiterd |")
    w("|---|---|---|---|")
    for n in (64, 1024):
        a = median(rss.get("arbiterd", {}).get(str(n), []))
        g = median(rss.get("gunicorn", {}).get(str(n), []))
        gs = "not run" if g is None else f"{g/1024:.1f} MiB"
        w(f"| {n} | {'n/a' if a is None else f'{a/1024:.2f} MiB'} | {gs} | {ratio(g, a)} |")
    a64 = median(rss.get("arbiterd", {}).get("64", []))
    targets.append(("master RSS at most 4 MiB at 64 workers", "n/a" if a64 is None else f"{a64/1024:.2f} MiB",
                    None if a64 is None else a64 <= 4096))
    w("")

    w(f"## Idle master, 64 workers, {b.idle_secs} s\n")
    w("CPU time (the run time of all its threads, /proc/PID/task/*/schedstat) and context switches (/proc/PID/task/*/status) of the master "
      "over the window, after 3 s of settling. A voluntary switch is the master going to sleep, so it counts "
      "its wakeups. The three masters idle at the same time; nothing talks to them during the window.\n")
    w("| master | CPU time | voluntary switches (wakeups) | per second | involuntary |")
    w("|---|---|---|---|---|")
    idle = r.get("idle", {})
    for k, runs in idle.items():
        cpu = median([d["cpu_ms"] for d in runs])
        vol = median([d["voluntary"] for d in runs])
        inv = median([d["nonvoluntary"] for d in runs])
        w(f"| {k} | {cpu:.2f} ms | {vol:g} | {vol / b.idle_secs:.2f} | {inv:g} |")
    if "arbiterd -t 0" in idle:
        v0 = median([d["voluntary"] for d in idle["arbiterd -t 0"]])
        targets.append(("idle master with --timeout 0: no periodic wakeups",
                        f"{v0:g} wakeups in {b.idle_secs} s", v0 == 0))
    w("")

    w("## Scale up by one: signal or command until the new worker serves\n")
    w("From the signal (or from launching the client) until a new child of the master is blocked waiting for "
      f"clients; {b.scale_trials} trials per run starting from 4 workers. Floor: `floor seq 300`, the median "
      "fork+exec of a tiny C program until it has written one byte.\n")
    sc = r.get("scale", {})
    fseq = median(fl.get("seq_us", []))
    fseq = None if fseq is None else fseq / 1e6
    w("| trigger | median | ratio to floor |")
    w("|---|---|---|")
    for k, v in sc.items():
        w(f"| {k} | {ms(median(v), 2)} (median of {len(v)} trials) | {ratio(median(v), fseq)} |")
    w(f"| floor: fork+exec+first byte | {ms(fseq, 2)} | 1x |")
    if not r.get("arbiterctl"):
        w("| arbiterd `arbiterctl scale +1` | not measured: arbiterctl did not work in this build | |")
    a_ttin, g_ttin = median(sc.get("arbiterd TTIN", [])), median(sc.get("gunicorn TTIN", []))
    w(f"\nTTIN: gunicorn / arbiterd = {ratio(g_ttin, a_ttin)}.")
    if r.get("arbiterctl"):
        a_sc = median(sc.get("arbiterd arbiterctl scale +1", []))
        g_sc = median(sc.get("gunicorn gunicornc worker add 1", []))
        w(f"`arbiterctl scale +1` against `gunicornc -c 'worker add 1'`: {ratio(g_sc, a_sc)}.")
        targets.append(("`arbiterctl scale +1` to serving within 20 ms", ms(a_sc, 2),
                        None if a_sc is None else a_sc <= 0.020))
    else:
        a_sc = median(sc.get("arbiterd raw scale request by=1", []))
        targets.append(("`arbiterctl scale +1` to serving within 20 ms",
                        f"arbiterctl not available; the raw scale request took {ms(a_sc, 2)}", None))
    w("")

    w("## Control latency: one status query, wall time\n")
    w(f"{b.reps} calls per run, each a new process (or, for the raw rows, a new connection from the harness).\n")
    w("| N | client | median |")
    w("|---|---|---|")
    ctl = r.get("control", {})
    for n, d in ctl.items():
        for k, v in d.items():
            w(f"| {n} | {k} | {ms(median(v), 2)} |")
        if not r.get("arbiterctl"):
            w(f"| {n} | arbiterctl status --json | not measured: arbiterctl did not work in this build |")
    c1024 = median(ctl.get("1024", {}).get("arbiterctl status --json", []))
    targets.append(("`arbiterctl status` at 1024 workers within 20 ms",
                    ("arbiterctl not available" if not r.get("arbiterctl") else
                     "not run (no 1024-worker boot in this mode)" if c1024 is None else ms(c1024, 2)),
                    None if c1024 is None else c1024 <= 0.020))
    w("")

    def load_table(title, data, note):
        w(f"## {title}\n")
        w(note + "\n")
        w("| server | requests (median) | failed (per run) | socket errors connect/read/write/timeout (per run) | non-2xx | actions done (per run) |")
        w("|---|---|---|---|---|---|")
        allzero, summary = True, []
        for k, runs in data.items():
            fails = [x["failures"] for x in runs]
            if k.startswith("arbiterd"):
                allzero &= all(f == 0 for f in fails)
                summary.append(f"{k}: {'/'.join(map(str, fails))} of {median([x['requests'] for x in runs]):.0f}")
            errs = "; ".join("/".join(str(x["socket_errors"][e]) for e in ("connect", "read", "write", "timeout"))
                             for x in runs)
            w(f"| {k} | {median([x['requests'] for x in runs]):.0f} | {', '.join(map(str, fails))} | {errs} | "
              f"{', '.join(str(x['non_2xx']) for x in runs)} | {', '.join(str(x['actions']) for x in runs)} |")
        return allzero, "failed per run: " + "; ".join(summary)

    if "reload" in r:
        ok, summary = load_table(f"Reload under load: HUP every {b.every} s for {b.load_secs} s",
                        r["reload"],
                        f"4 workers; `wrk -t2 -c32 -d{b.load_secs}s --timeout 2s`, with `Connection: close` "
                        "(gunicorn's sync worker closes every connection anyway) and, for arbiterd, also with "
                        "keep-alive. A failure is any socket error wrk reports (connect, read, write, timeout) "
                        "or a non-2xx answer. The control row runs the same master with `bench/cworker.c` "
                        "(a blocking C worker that always answers a connection it accepted) instead of the "
                        "built-in worker, to tell the master's part from the worker's.")
        extra = [x.get("last_reload") for runs in r["reload"].values() for x in runs if x.get("last_reload")]
        if extra:
            w("\narbiterd's reload count and last reload, per run: " + "; ".join(
                f"{k}: " + ", ".join(f"{x.get('reloads_done')} reloads, last gen {x['last_reload']['generation']} "
                                     f"ok={x['last_reload']['ok']}" for x in runs if x.get("last_reload"))
                for k, runs in r["reload"].items() if k != "gunicorn (Connection: close)") + "\n")
        targets.append(("zero failed requests under reload load", summary, ok))
    else:
        w("## Reload under load\n\nNot measured: " + r["errors"].get("reload", "see errors") + "\n")
    if "upgrade" in r:
        meth = {"arbiterctl": "`arbiterctl upgrade` (waits for the new master's workers, retires the old master)",
                "request": "the `upgrade` control request sent by the harness (arbiterctl did not work in this build)",
                "usr2": "USR2 to the master, wait for its new master's workers, then TERM to the old master "
                        "(neither `arbiterctl upgrade` nor the upgrade request worked)"}[r["upgrade_method"]]
        ok, summary = load_table(f"Upgrade under load: back-to-back upgrades, at most one every {b.every} s, for {b.load_secs} s",
                        r["upgrade"],
                        f"arbiterd: {meth}. gunicorn: USR2, wait until the new master's 4 workers serve, "
                        "TERM to the old master, wait until it exits and the new one is promoted. Same wrk "
                        "command, `Connection: close`. The control row: as in the reload table.")
        ups = {k: median([a["took"] for x in runs for a in x["action_log"]]) for k, runs in r["upgrade"].items()}
        w("\nMedian time per upgrade: " + ", ".join(f"{k} {v:.2f} s" for k, v in ups.items() if v) + "\n")
        targets.append(("zero failed requests under upgrade load", summary, ok))
    else:
        w("## Upgrade under load\n\nNot measured: " + r["errors"].get("upgrade", "see errors") + "\n")

    w("## Hung worker: SIGSTOP until its replacement serves, `-t 2`\n")
    w("2 workers, `-t 2`; after 2.5 s of serving, one worker gets SIGSTOP (it stops beating); the time runs "
      "until a new child of the master is waiting for clients. The replacement is due at the worker's last "
      "beat + 2 s, which is before SIGSTOP + 2 s by the beat's age at the SIGSTOP (read from the master just "
      "before: arbiterd's status, gunicorn's `show workers`). *Late* is how long after that due moment the "
      "replacement served.\n")
    w("| server | from SIGSTOP, median | max | late past the deadline, median | each: from SIGSTOP (beat age, late) |")
    w("|---|---|---|---|---|")
    to = {k: v for k, v in r.get("timeout", {}).items() if not k.endswith("healthy workers timed out")}
    healthy = {k.split()[0]: v for k, v in r.get("timeout", {}).items() if k.endswith("healthy workers timed out")}
    for k, v in to.items():
        each = ", ".join(f"{ms(x['secs'], 0)}" + (f" ({x['beat_age_at_stop']:.2f} s, {ms(x['late'], 0)})"
                                                  if x.get("late") is not None else "") for x in v)
        w(f"| {k} | {ms(median([x['secs'] for x in v]), 0)} | {ms(max(x['secs'] for x in v), 0)} | "
          f"{ms(median([x.get('late') for x in v]), 0)} | {each} |")
    if healthy:
        w("\nWorkers that were never stopped but were timed out all the same (from each master's log, per run): "
          + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in healthy.items())
          + ". Any of those means the master or the whole machine stalled for about the timeout; see the CPU "
            "pressure above.")
    if "arbiterd" in to:
        worst = max(x["secs"] for x in to["arbiterd"])
        targets.append(("hung worker replaced within timeout + 100 ms of the hang (2.1 s)", f"worst {ms(worst, 0)}",
                        worst <= 2.1))
    w("")

    # 5x targets
    five = []
    for n in b.ns:
        a = median(boot.get("arbiterd", {}).get(str(n), []))
        g = median(boot.get("gunicorn", {}).get(str(n), []))
        if a and g:
            five.append((f"boot {n}", g / a))
    for n in ("64", "1024"):
        a = median(rss.get("arbiterd", {}).get(n, []))
        g = median(rss.get("gunicorn", {}).get(n, []))
        if a and g:
            five.append((f"master RSS {n}", g / a))
    if idle.get("arbiterd -t 30") and idle.get("gunicorn -t 30"):
        a = median([d["cpu_ms"] for d in idle["arbiterd -t 30"]])
        g = median([d["cpu_ms"] for d in idle["gunicorn -t 30"]])
        five.append(("idle master CPU time (-t 30)", g / a if a else (float("inf") if g else None)))
        a = median([d["voluntary"] for d in idle["arbiterd -t 30"]])
        g = median([d["voluntary"] for d in idle["gunicorn -t 30"]])
        five.append(("idle master wakeups (-t 30)", g / a if a else (float("inf") if g else None)))
    if a_ttin and g_ttin:
        five.append(("TTIN to serving", g_ttin / a_ttin))
    if r.get("arbiterctl"):
        a_sc = median(sc.get("arbiterd arbiterctl scale +1", []))
        g_sc = median(sc.get("gunicorn gunicornc worker add 1", []))
        if a_sc and g_sc:
            five.append(("scale +1 by the control client", g_sc / a_sc))
    for n in ("64", "1024"):
        a = median(ctl.get(n, {}).get("arbiterctl status --json", []))
        g = median(ctl.get(n, {}).get("gunicornc -c 'show workers' -j", []))
        if a and g:
            five.append((f"status by the control client at {n}", g / a))
    if to.get("arbiterd") and to.get("gunicorn"):
        a = median([x["secs"] for x in to["arbiterd"]])
        g = median([x["secs"] for x in to["gunicorn"]])
        five.append(("hung worker: SIGSTOP to replacement serving (bounded by the 2 s timeout)", g / a))
        a = median([x.get("late") for x in to["arbiterd"]])
        g = median([x.get("late") for x in to["gunicorn"]])
        if a and g:
            five.append(("hung worker: lateness past the heartbeat deadline", g / a))

    w("## Targets\n")
    w("| target | measured | met |")
    w("|---|---|---|")
    for t, fig, met in targets:
        w(f"| {t} | {fig} | {'yes' if met else ('no' if met is not None else 'not measured')} |")
    for name, x in five:
        if x is None:
            w(f"| at least 5x better than gunicorn: {name} | both 0 | n/a |")
        elif x == float("inf"):
            w(f"| at least 5x better than gunicorn: {name} | arbiterd 0, gunicorn more | yes |")
        else:
            w(f"| at least 5x better than gunicorn: {name} | {x:.1f}x | {'yes' if x >= 5 else 'no'} |")
    w("")
    w("Two comparisons are structurally bounded: gunicorn's TTIN forks its already-initialised Python master "
      "without an exec, while every arbiterd worker is fork+exec'd (`floor seq` above is the cost of the exec "
      "alone); and a hung worker cannot be replaced before its heartbeat deadline, so with `-t 2` neither "
      "server can go below about 2 s minus the beat's age (the lateness row compares what is left).\n")

    if r["errors"]:
        w("## What failed to run\n")
        for k, v in r["errors"].items():
            w(f"- {k}: {v}")
        w("")

    w("## Exact commands\n")
    w("The harness: `bench/run.sh" + (" --quick" if b.quick else "") + "` (builds with `cargo build --release --bins`, "
      "compiles `bench/floor.c` and `bench/cworker.c` with `cc -O2`, then runs `bench/run.py`). Below, each distinct "
      "command line, from the repository root (gunicorn runs with `bench/` as its working directory); "
      "`$PORT` is a port picked free at run time, `$RUN` the run's scratch directory (`NAME`: server, worker count and timeout), `$N` the worker count.\n")
    w("```")
    merged = {}  # the same command but for the scratch file names: one line
    for line, uses in b.commands.items():
        line = re.sub(r"\$RUN/\w+-\$PORT\.", "$RUN/NAME-$PORT.", line)
        merged.setdefault(line, [])
        merged[line] += [u for u in uses if u not in merged[line]]
    for line, uses in merged.items():
        w(f"# {', '.join(uses)}")
        w(line)
    w("```")
    w("")
    return "\n".join(L)


SETTINGS = ("quick", "runs", "ns", "gunicorn_max", "idle_secs", "load_secs", "every", "reps", "scale_trials",
            "timeout_trials", "workdir")


# Everything from this line on in RESULTS.md is written by hand (the reliability
# test runs, profiles of missed targets; this harness does not measure them) and is
# carried over when the report is written again.
KEPT_MARKER = "<!-- kept by bench/run.py: the hand-written sections from here on (reliability, profiles); this harness does not measure them -->"


def write_report(out, text):
    kept = ""
    try:
        with open(out) as f:
            old = f.read()
        if KEPT_MARKER in old:
            kept = "\n" + old[old.index(KEPT_MARKER):]
    except FileNotFoundError:
        pass
    with open(out, "w") as f:
        f.write(text + kept)


def report_from(path, out):
    """Write the report again from a run's results.json (no measuring)."""
    import types
    with open(path) as f:
        data = json.load(f)
    b = types.SimpleNamespace(r=data["results"], commands=data["commands"], **data["settings"])
    text = report(b) + (f"\nTotal run time: {b.r['took_secs']:.0f} s. Raw data: `{rel(b.workdir)}/results.json` "
                        "(not committed).\n")
    write_report(out, text)
    log(f"wrote {out} from {path}")


def rel(a):
    a = str(a)
    return a.replace(ROOT + "/", "")


# ---------------------------------------------------------------- main


def main():
    global PROCS
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 run each, smaller N and shorter windows")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3, 1 with --quick)")
    ap.add_argument("--worker", choices=["auto", "builtin", "c"], default="auto",
                    help="arbiterd's worker: the built-in one, bench/cworker.c, or the built-in if it serves")
    ap.add_argument("--gunicorn-max", type=int, help="largest N gunicorn is booted with (default 1024, 64 quick)")
    ap.add_argument("--only", help="comma-separated sections: boot,idle,scale,reload,upgrade,timeout")
    ap.add_argument("--out", help="where to write the report (default bench/RESULTS.md; "
                                  "bench/.work/RESULTS-quick.md with --quick)")
    ap.add_argument("--report-from", metavar="RESULTS_JSON", help="only write the report from a run's results.json")
    args = ap.parse_args()
    if args.report_from:
        report_from(args.report_from, args.out or os.path.join(BENCH, "RESULTS.md"))
        return
    for path, what in ((ARBITERD, "arbiterd"), (GUNICORN, "gunicorn"), (FLOOR, "the floor program")):
        if not os.access(path, os.X_OK):
            sys.exit(f"{what} not found at {path}: run bench/run.sh")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    PROCS = Processes()
    b = Bench(args)
    out = args.out or (os.path.join(SCRATCH, "RESULTS-quick.md") if args.quick else os.path.join(BENCH, "RESULTS.md"))
    t = time.monotonic()
    sections = [("boot", b.boot), ("idle", b.idle), ("scale", b.scale),
                ("reload", b.reload), ("upgrade", b.upgrade), ("timeout", b.timeouts)]
    only = set(args.only.split(",")) if args.only else None
    try:
        b.probe()
        for name, fn in sections:
            if only is None or name in only:
                b.section(name, fn)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        PROCS.cleanup()
        sys.exit(130)
    finally:
        PROCS.cleanup()
    b.r["took_secs"] = time.monotonic() - t
    settings = {k: getattr(b, k) for k in SETTINGS}
    with open(os.path.join(b.workdir, "results.json"), "w") as f:
        json.dump({"results": b.r, "commands": b.commands, "settings": settings}, f, indent=1)
    text = report(b) + f"\nTotal run time: {b.r['took_secs']:.0f} s. Raw data: `{rel(b.workdir)}/results.json` (not committed).\n"
    write_report(out, text)
    log(f"wrote {out} in {b.r['took_secs']:.0f} s")


if __name__ == "__main__":
    main()

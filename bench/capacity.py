#!/usr/bin/env python3
"""Capacity: a load step under autoscaling, the cost of one autoscaler sample, and
the same Python app under arbiterd and gunicorn side by side.

    python3 bench/capacity.py [--only step,sample,python] [--quick] [--write]

1. step: arbiterd running bench/slow_app.py (20 ms per request, one at a time per
   worker), a closed-loop load of LOW concurrent clients for --low-secs, then HIGH
   for --high-secs (keep-alive off: one connection per request), for
   `--workers 2..16`, fixed 2 and fixed 16. Latency windows, failures, the
   autoscaler's steps from the log, the accept queue sampled once a second with
   `arbiterctl status --json`, the master's CPU from /proc/PID/stat.
2. sample: the built-in worker, 1024 workers idle, `-w 1024` (autoscaler off)
   against `-w 1023..1024 --max-workers 1024` (on, sampling 4 times a second): the
   master's CPU over 30 s; the difference / 120 samples is one sample's cost.
3. python: bench/gunicorn_app.py under gunicorn (sync worker) and under arbiterd
   (each worker `gunicorn -c examples/gunicorn/gunicorn.conf.py`, one gunicorn
   worker each, as examples/gunicorn/README.md recommends): boot to N serving,
   TTIN to serving, HUP every 2 s for 20 s under load.

Stdlib only. Processes are kept as bench/run.py keeps them (its helpers are
imported): each server leads a new session with PR_SET_PDEATHSIG, the script is a
child subreaper, every session is SIGKILLed at teardown and on exit, error, Ctrl-C
or TERM. Ports are picked free; logs and results.json go to bench/.work/capacity-*/,
control sockets to a new /tmp/arbcap-*/ removed at the end. With --write the
report replaces the section SECTION of bench/RESULTS.md (or is appended at the end,
after run.py's kept-marker). See bench/README.md.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
SCRATCH = os.path.join(BENCH, ".work")
RESULTS = os.path.join(BENCH, "RESULTS.md")
SECTION = "## Capacity: a load step, autoscaling, and a Python app side by side"
SLOW_APP = os.path.join(BENCH, "slow_app.py")
GUNICORN_CONF = os.path.join(ROOT, "examples", "gunicorn", "gunicorn.conf.py")
PY = sys.executable
SERVICE = 0.020  # slow_app.py's hold per request

sys.dont_write_bytecode = True
sys.path.insert(0, BENCH)
import run as H  # noqa: E402  (bench/run.py: /proc helpers, Processes, Ctl)

ARBITERD = H.ARBITERD
ARBITERCTL = H.ARBITERCTL
PROCS = None
CLK_TCK = os.sysconf("SC_CLK_TCK")
AUTOSCALE_RE = re.compile(r"Autoscale: workers (\d+) -> (\d+)")


def log(msg):
    print(f"[capacity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def ticks(pid):
    """utime + stime of the process (all threads), in clock ticks (/proc/PID/stat)."""
    f = H.stat_fields(pid)
    return int(f[11]) + int(f[12])


def all_children(pid):
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


def pct(xs, p):
    """Nearest-rank percentile of a sorted list."""
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def wait_for(pred, limit, what, poll=0.005):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}")


# ---------------------------------------------------------------- load


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


class Load:
    """Closed-loop clients, one thread each: connect, send one request with
    `Connection: close`, read until the server closes, again. A record per request:
    (start, end, error or None). An error is a connection error, the 5 s timeout
    (whole request), or an answer other than 200."""

    def __init__(self, port, timeout=5.0):
        self.port, self.timeout = port, timeout
        self.records = []
        self.stop_evt = threading.Event()
        self.threads = []

    def add(self, n):
        for _ in range(n):
            t = threading.Thread(target=self.client, daemon=True)
            t.start()
            self.threads.append(t)

    def client(self):
        rec = self.records.append
        addr = ("127.0.0.1", self.port)
        while not self.stop_evt.is_set():
            t0 = time.monotonic()
            err = None
            try:
                s = socket.create_connection(addr, timeout=self.timeout)
                try:
                    s.sendall(REQUEST)
                    buf = b""
                    while True:
                        left = t0 + self.timeout - time.monotonic()
                        if left <= 0:
                            raise socket.timeout()
                        s.settimeout(left)
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                finally:
                    s.close()
                if buf[9:12] != b"200":
                    err = "status " + (buf[9:12].decode(errors="replace") or "none (closed)")
            except socket.timeout:
                err = "timeout"
            except OSError as e:
                err = type(e).__name__
            rec((t0, time.monotonic(), err))

    def stop(self):
        self.stop_evt.set()
        for t in self.threads:
            t.join(self.timeout + 2)


def summarize(recs, t_from, t_to):
    """Requests started in [t_from, t_to): count, failures by kind, p50/p99 of the good ones."""
    sel = [r for r in recs if t_from <= r[0] < t_to]
    lat = sorted(r[1] - r[0] for r in sel if r[2] is None)
    fails = {}
    for r in sel:
        if r[2] is not None:
            fails[r[2]] = fails.get(r[2], 0) + 1
    return {"requests": len(sel), "failed": sum(fails.values()), "fail_kinds": fails,
            "p50": pct(lat, 50), "p99": pct(lat, 99),
            "rps": len(sel) / (t_to - t_from) if t_to > t_from else None}


# ---------------------------------------------------------------- the log and the queue


class LogTail(threading.Thread):
    """Reads the master's log as it grows (every 50 ms): each autoscale step with the
    monotonic time it was seen."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.events, self.stop_evt = path, [], threading.Event()
        self.pos = os.path.getsize(path) if os.path.exists(path) else 0

    def scan(self):
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        now = time.monotonic()
        for line in data[:end].decode(errors="replace").splitlines():
            m = AUTOSCALE_RE.search(line)
            if m:
                self.events.append({"t": now, "from": int(m.group(1)), "to": int(m.group(2)),
                                    "line": line.split("] ", 3)[-1]})

    def run(self):
        while not self.stop_evt.wait(0.05):
            self.scan()

    def stop(self):
        self.stop_evt.set()
        self.join(2)
        self.scan()


def status_json(ctl_path):
    """`arbiterctl --control PATH status --json`, parsed (the master's part)."""
    out = subprocess.run([ARBITERCTL, "--control", ctl_path, "status", "--json"],
                         capture_output=True, text=True, timeout=10)
    doc = json.loads(out.stdout)
    return doc.get("reply", doc)


class QueueSampler(threading.Thread):
    """`arbiterctl status --json` once a second: the summed accept queue, target, ready."""

    def __init__(self, ctl_path):
        super().__init__(daemon=True)
        self.ctl_path, self.samples, self.errors = ctl_path, [], 0
        self.stop_evt = threading.Event()

    def run(self):
        nxt = time.monotonic()
        while not self.stop_evt.is_set():
            t = time.monotonic()
            try:
                m = status_json(self.ctl_path)["master"]
                self.samples.append({"t": t, "queue": sum(l["queue"] for l in m["listeners"]),
                                     "target": m["target"], "ready": m["ready"]})
            except Exception:
                self.errors += 1
            nxt += 1.0
            self.stop_evt.wait(max(0.0, nxt - time.monotonic()))

    def stop(self):
        self.stop_evt.set()
        self.join(12)


# ---------------------------------------------------------------- servers


class Server:
    """arbiterd or gunicorn on a fresh port, in a session of its own."""

    def __init__(self, cap, kind, argv_tail, n_label, port=None):
        self.cap, self.kind = cap, kind
        self.port = port or H.free_port()
        self.name = f"cap{self.port}"
        self.log = os.path.join(cap.workdir, f"{kind}-{self.name}.log")
        self.ctl = os.path.join(cap.sockdir, f"{self.name}.sock")
        self.pidfile = os.path.join(cap.workdir, f"{self.name}.pid")
        if kind == "arbiterd":
            self.argv = [ARBITERD, "-n", self.name, "-b", f"127.0.0.1:{self.port}", "--control", self.ctl,
                         "-p", self.pidfile] + argv_tail
        else:
            self.argv = [PY, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}", "-k", "sync",
                         "--control-socket", self.ctl, "-p", self.pidfile] + argv_tail
        cap.record(n_label, self.argv, self)
        self.popen = None

    def start(self):
        self.t0 = time.monotonic()
        self.popen = PROCS.start(self.argv, self.log)
        self.master = self.popen.pid
        return self

    def check(self):
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.kind} exited with {self.popen.returncode}; see {self.log}")

    def status(self):
        c = H.Ctl(self.ctl)
        try:
            return c.status()
        except OSError:
            return None
        finally:
            c.close()

    def serving(self):
        """Pids that run the app and are blocked waiting for clients. gunicorn: the
        master's children (sync workers). arbiterd with a COMMAND of gunicorn: the
        gunicorn workers, grandchildren of arbiterd (a gunicorn master waits in
        select too, so it is not counted). arbiterd otherwise: its children."""
        kids = all_children(self.master)
        if self.kind == "arbiterd" and self.cap.grandchildren:
            kids = [g for k in kids for g in all_children(k)]
        return {k for k in kids if H.waiting_for_clients(k)}

    def wait_serving(self, n, limit=120.0, poll=0.005):
        deadline = self.t0 + limit
        while time.monotonic() < deadline:
            self.check()
            s = self.serving()
            if len(s) >= n:
                return time.monotonic() - self.t0, s
            time.sleep(poll)
        raise RuntimeError(f"{self.kind}: {n} workers not serving after {limit:.0f}s; see {self.log}")

    def get(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(REQUEST)
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        if buf[9:12] != b"200":
            raise RuntimeError(f"{self.kind} answered {buf[:80]!r}")
        return buf

    def stop(self):
        if self.popen is not None:
            PROCS.end_session(self.popen.pid, first=signal.SIGKILL)
            self.popen = None


# ---------------------------------------------------------------- the runs


class Cap:
    def __init__(self, args):
        self.args = args
        q = args.quick
        self.low = args.low
        self.low_secs = 4 if q else args.low_secs
        self.high_secs = 10 if q else args.high_secs
        self.specs = args.specs.split(",")
        self.highs = [int(x) for x in args.high.split(",")]
        self.sample_n = 256 if q else args.sample_workers
        self.idle_secs = 10 if q else 30
        self.sample_reps = 1 if q else args.sample_reps
        self.py_ns = [4] if q else [4, 16]
        self.py_runs = 1 if q else args.py_runs
        self.reload_secs = 8 if q else 20
        self.grandchildren = False
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.workdir = os.path.join(SCRATCH, "capacity-" + stamp)
        os.makedirs(self.workdir, exist_ok=True)
        self.sockdir = tempfile.mkdtemp(prefix="arbcap-")
        self.commands = {}
        self.r = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip(),
                  "nproc": os.cpu_count(), "quick": q, "errors": {}}

    def record(self, what, argv, s=None):
        def t(a):
            a = str(a)
            if s is not None:
                a = a.replace(s.ctl, "$SOCK").replace(s.pidfile, "$PIDFILE").replace(s.name, "cap$PORT")
                a = a.replace(str(s.port), "$PORT")
            a = a.replace(PY, "python3").replace(ROOT + "/", "")
            return a
        line = " ".join(a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else shlex.quote(a) for a in map(t, argv))
        self.commands.setdefault(line, [])
        if what not in self.commands[line]:
            self.commands[line].append(what)

    def section(self, name, fn):
        la = loadavg()
        self.r.setdefault("loadavg_start", {})[name] = la
        log(f"== {name} (load average {la})")
        t = time.monotonic()
        p0 = H.cpu_pressure_us()
        try:
            fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self.r["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED: {e}")
            traceback.print_exc()
        took = time.monotonic() - t
        p1 = H.cpu_pressure_us()
        if p0 is not None and p1 is not None:
            # Share of the part's wall time during which some runnable task waited for a CPU.
            self.r.setdefault("cpu_pressure", {})[name] = (p1 - p0) / 1e6 / took
        log(f"   {name} took {took:.0f} s")

    # -- 1. the load step

    def step(self):
        out = self.r["step"] = []
        for high in self.highs:
            for spec in self.specs:
                out.append(self.step_run(spec, high))

    def step_run(self, spec, high):
        lo = int(spec.split("..")[0])
        hi = int(spec.split("..")[-1])
        s = Server(self, "arbiterd", ["-w", spec, "--ready", "notify", "--", PY, SLOW_APP],
                   f"step -w {spec}").start()
        tail = sampler = load = None
        try:
            s.wait_serving(lo, limit=30)
            s.get()
            tail = LogTail(s.log)
            tail.start()
            sampler = QueueSampler(s.ctl)
            la0 = loadavg()
            cpu0, sch0 = ticks(s.master), H.cpu_secs(s.master)
            sampler.start()
            load = Load(s.port)
            t0 = time.monotonic()
            load.add(self.low)
            time.sleep(max(0.0, t0 + self.low_secs - time.monotonic()))
            t_step = time.monotonic()
            load.add(high - self.low)
            time.sleep(max(0.0, t_step + self.high_secs - time.monotonic()))
            t_end = time.monotonic()
            load.stop()
            cpu1, sch1 = ticks(s.master), H.cpu_secs(s.master)
            t_after = time.monotonic()
            la1 = loadavg()
            sampler.stop()
            tail.stop()
            s.check()
        finally:
            for x in (load, sampler, tail):
                if x is not None:
                    x.stop()
            s.stop()
        recs = load.records
        res = {"spec": spec, "min": lo, "max": hi, "low": self.low, "high": high,
               "low_secs": self.low_secs, "high_secs": self.high_secs,
               "loadavg": [la0, la1], "master_ticks": cpu1 - cpu0, "master_cpu_ms": (sch1 - sch0) * 1000,
               "run_secs": t_after - t0,
               "low_phase": summarize(recs, t0, t_step), "high_phase": summarize(recs, t_step, t_end),
               "high_last10": summarize(recs, t_end - 10, t_end),
               "all": summarize(recs, t0, t_end + 10)}
        # 1 s windows by request start, sliding by 0.1 s, from the step on: p99 of
        # the window's requests (a failed request counts as infinitely slow).
        wins = []
        k = 0
        while t_step + k * 0.1 + 1.0 <= t_end:
            a = t_step + k * 0.1
            lat = sorted((r[1] - r[0]) if r[2] is None else float("inf") for r in recs if a <= r[0] < a + 1.0)
            wins.append([round(k * 0.1, 1), pct(lat, 99), len(lat)])
            k += 1
        res["windows"] = wins
        thr = 3 * SERVICE
        below = [w[0] for w in wins if w[1] is not None and w[1] < thr]
        res["absorb_first"] = below[0] if below else None
        stays = None
        for w in reversed(wins):
            if w[1] is None or w[1] >= thr:
                break
            stays = w[0]
        res["absorb_stays"] = stays
        ev = [{"t": e["t"] - t_step, "from": e["from"], "to": e["to"], "line": e["line"]} for e in tail.events]
        res["events"] = ev
        dirs = [1 if e["to"] > e["from"] else -1 for e in ev]
        res["direction_changes"] = sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
        res["ups"] = dirs.count(1)
        res["downs"] = dirs.count(-1)
        res["workers_at_step"] = lo + sum(d for e, d in zip(ev, dirs) if e["t"] < 0)
        res["workers_at_end"] = lo + sum(dirs)
        top = [e["t"] for e in ev if e["to"] == hi]
        res["reached_max_after"] = top[0] if top else None
        sm = [{"t": round(x["t"] - t_step, 2), "queue": x["queue"], "target": x["target"], "ready": x["ready"]}
              for x in sampler.samples]
        res["samples"] = sm
        res["sampler_errors"] = sampler.errors
        res["max_queue"] = max((x["queue"] for x in sm), default=None)
        res["queue_le1_after"] = queue_le1(sm, self.high_secs)
        h = res["high_phase"]
        log(f"   -w {spec}, {self.low}->{high} clients: high p50 {fmt_ms(h['p50'])} p99 {fmt_ms(h['p99'])}, "
            f"{h['requests']} requests, failed {res['all']['failed']} {res['all']['fail_kinds']}, "
            f"absorbed {res['absorb_first']} / stays {res['absorb_stays']}, {res['ups']} up {res['downs']} down, "
            f"at step {res['workers_at_step']}, max after {res['reached_max_after']}, max queue {res['max_queue']}, "
            f"master {res['master_ticks']} ticks, load {la0}->{la1}")
        return res

    # -- 2. the cost of one sample

    def sample(self):
        n = self.sample_n
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 4 * n + 256
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
        out = self.r["sample"] = {"n": n, "idle_secs": self.idle_secs, "runs": []}
        modes = [("fixed", ["-w", str(n)]),
                 ("autoscale", ["-w", f"{n - 1}..{n}", "--max-workers", str(n)])]
        for rep in range(self.sample_reps):
            for name, tail in (modes if rep % 2 == 0 else modes[::-1]):
                s = Server(self, "arbiterd", tail, f"sample ({name})").start()
                try:
                    want = n if name == "fixed" else n - 1
                    wait_for(lambda: s.check() or len(all_children(s.master)) >= want, 120,
                             f"{want} children", poll=0.05)
                    wait_for(lambda: (st := s.status()) and st["master"]["ready"] >= want, 120,
                             f"{want} ready workers", poll=0.2)
                    boot = time.monotonic() - s.t0
                    time.sleep(3)  # settle after boot (pacing, not a wait for a state)
                    la0 = loadavg()
                    t0, sch0 = ticks(s.master), H.cpu_secs(s.master)
                    v0 = H.status_value(s.master, "voluntary_ctxt_switches", True)
                    w0 = time.monotonic()
                    time.sleep(self.idle_secs)
                    t1, sch1 = ticks(s.master), H.cpu_secs(s.master)
                    v1 = H.status_value(s.master, "voluntary_ctxt_switches", True)
                    secs = time.monotonic() - w0
                    la1 = loadavg()
                    st = s.status()["master"]
                    d = {"mode": name, "rep": rep, "boot_secs": boot, "window_secs": secs,
                         "ticks": t1 - t0, "cpu_ms": (sch1 - sch0) * 1000, "wakeups": v1 - v0,
                         "target_after": st["target"], "autoscale": st.get("autoscale"), "loadavg": [la0, la1]}
                    out["runs"].append(d)
                    log(f"   {name} rep {rep + 1}: {d['ticks']} ticks, {d['cpu_ms']:.1f} ms CPU, "
                        f"{d['wakeups']} wakeups in {secs:.1f} s (boot {boot:.1f} s, load {la0}->{la1})")
                finally:
                    s.stop()

    # -- 3. the same Python app

    def py_server(self, kind, n, label):
        if kind == "arbiterd":
            tail = ["-w", str(n), "--ready", "notify", "--", PY, "-m", "gunicorn", "-c", GUNICORN_CONF,
                    "gunicorn_app:app"]
        else:
            tail = ["-w", str(n), "gunicorn_app:app"]
        return Server(self, kind, tail, label)

    def python(self):
        self.grandchildren = True
        out = self.r["python"] = {"boot": [], "ttin": [], "reload": []}
        try:
            for run in range(self.py_runs):
                for n in self.py_ns:
                    order = ["arbiterd", "gunicorn"] if run % 2 == 0 else ["gunicorn", "arbiterd"]
                    for kind in order:
                        s = self.py_server(kind, n, f"python boot ({kind})").start()
                        try:
                            la = loadavg()
                            secs, _ = s.wait_serving(n, limit=120)
                            s.get()
                            out["boot"].append({"kind": kind, "n": n, "secs": secs, "loadavg": la})
                            log(f"   boot {kind} N={n}: {secs * 1000:.0f} ms (load {la})")
                        finally:
                            s.stop()
            for kind in ("arbiterd", "gunicorn"):
                s = self.py_server(kind, 4, f"python TTIN ({kind})").start()
                try:
                    s.wait_serving(4)
                    for i in range(self.args.ttin_trials):
                        want = 4 + i
                        before = wait_for(lambda: len(x := s.serving()) == want and x, 30,
                                          f"{want} serving")
                        time.sleep(0.3)
                        before = s.serving()
                        la = loadavg()
                        t0 = time.monotonic()
                        os.kill(s.master, signal.SIGTTIN)
                        wait_for(lambda: s.serving() - before, 30, "a new worker serving", poll=0.0005)
                        dt = time.monotonic() - t0
                        out["ttin"].append({"kind": kind, "secs": dt, "loadavg": la})
                        log(f"   TTIN {kind}: {dt * 1000:.1f} ms (load {la})")
                finally:
                    s.stop()
            for run in range(self.py_runs):
                for kind in (("arbiterd", "gunicorn") if run % 2 == 0 else ("gunicorn", "arbiterd")):
                    out["reload"].append(self.reload_run(kind))
        finally:
            self.grandchildren = False

    def reload_run(self, kind):
        s = self.py_server(kind, 4, f"python reload ({kind})").start()
        load = None
        try:
            s.wait_serving(4)
            s.get()
            la0 = loadavg()
            load = Load(s.port)
            t0 = time.monotonic()
            load.add(self.args.reload_clients)
            hups = 0
            for i in range(1, int(self.reload_secs / 2)):
                time.sleep(max(0.0, t0 + 2 * i - time.monotonic()))
                os.kill(s.master, signal.SIGHUP)
                hups += 1
            time.sleep(max(0.0, t0 + self.reload_secs - time.monotonic()))
            t_end = time.monotonic()
            load.stop()
            s.check()
            la1 = loadavg()
            extra = {}
            if kind == "arbiterd":
                st = s.status()
                if st:
                    extra = {"reloads": st["master"]["reloads"], "last_reload": st["master"]["last_reload"]}
        finally:
            if load is not None:
                load.stop()
            s.stop()
        res = {"kind": kind, "hups": hups, "secs": self.reload_secs, "clients": self.args.reload_clients,
               "loadavg": [la0, la1], **summarize(load.records, t0, t_end + 10), **extra}
        log(f"   reload {kind}: {res['requests']} requests, {res['failed']} failed {res['fail_kinds']}, "
            f"p99 {fmt_ms(res['p99'])}, {hups} HUPs (load {la0}->{la1})")
        return res


# ---------------------------------------------------------------- report


def queue_le1(samples, high_secs):
    """The first queue sample after the step (t > 0) with a summed queue of at most 1."""
    t = [x["t"] for x in samples if 0 < x["t"] <= high_secs and x["queue"] <= 1]
    return t[0] if t else None


def fmt_ms(x, d=0):
    if x is None:
        return "n/a"
    if x == float("inf"):
        return "failed"
    return f"{x * 1000:.{d}f} ms"


def fmt_s(x):
    return "never" if x is None else f"{x:.1f} s"


def report(cap, command):
    r = cap.r
    L = []
    w = L.append
    w(SECTION)
    w("")
    w(f"Measured by `bench/capacity.py` on {r['started']} at git `{r['git']}`, release binaries "
      f"(`cargo build --release --bins`), on a {r['nproc']}-core machine shared with other engineers' builds "
      "and test runs: **every figure is noisy**; the 1-minute load average is written next to each (before "
      "and after where there is a window). One benchmark process at a time. To reproduce:")
    w("")
    w(f"    {command}")
    w("")
    w("Load average at the start of each part: " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("loadavg_start", {}).items())
      + "; CPU pressure during it (share of the time some runnable task waited for a CPU, `/proc/pressure/cpu`): "
      + ", ".join(f"{k} {v:.0%}" for k, v in r.get("cpu_pressure", {}).items())
      + "; the pressure counts the benchmark's own processes too: the load parts keep both cores busy by "
        "themselves (Python clients and Python workers), so only the idle sample part tells others' load apart.")
    w("")
    if "step" in r:
        w("### A load step under autoscaling")
        w("")
        w(f"Workers: `bench/slow_app.py` (one request at a time, held {SERVICE * 1000:.0f} ms, then closed; no "
          "scoreboard, so the autoscaler sees the accept queue only), `--ready notify`. Load: Python threads, "
          f"closed loop, one connection per request (`Connection: close`), {cap.low} clients for "
          f"{cap.low_secs:g} s, then {' or '.join(map(str, cap.highs))} clients (one run each) for {cap.high_secs:g} s. A failure is a connection error, "
          "the 5 s timeout or a non-200 answer. *Absorbed*: requests are grouped in 1 s windows by their "
          "start time, sliding by 0.1 s from the step; the figure is the start (from the step) of the first "
          f"window whose p99 is below 3x the service time ({3 * SERVICE * 1000:.0f} ms; a failed request "
          "counts as infinitely slow), and *stays* the start of the window from which every later window is "
          "below it. *Queue <= 1*: the first of the once-a-second `arbiterctl status --json` samples after "
          "the step whose summed `queue` is at most 1. Scale steps are the `Autoscale: workers A -> B` lines "
          "of arbiterd's log, timed when the harness saw them (it reads the log every 50 ms); *flaps* counts "
          "changes of direction. Master CPU: utime+stime from `/proc/PID/stat` over the whole run (low + "
          f"high phase, {CLK_TCK} ticks/s), which includes answering the once-a-second status request.")
        w("")
        w("| -w | clients | workers at step | p50 / p99 high phase | p99 last 10 s | req/s high | failed | "
          "absorbed (first / stays) | queue <= 1 | scale steps up/down, flaps | at MAX after | max queue | "
          "master CPU | load avg |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for x in r["step"]:
            h = x["high_phase"]
            fk = x["all"]["fail_kinds"]
            failed = f"{x['all']['failed']}" + (f" ({', '.join(f'{k} {v}' for k, v in fk.items())})" if fk else "")
            auto = ".." in x["spec"]
            w(f"| {x['spec']} | {x['low']} -> {x['high']} | {x['workers_at_step']} | {fmt_ms(h['p50'])} / "
              f"{fmt_ms(h['p99'])} | {fmt_ms(x['high_last10']['p99'])} | {h['rps']:.0f} | {failed} of "
              f"{x['all']['requests']} | {fmt_s(x['absorb_first'])} / {fmt_s(x['absorb_stays'])} | "
              f"{fmt_s(queue_le1(x['samples'], x['high_secs']))} | "
              + (f"{x['ups']}/{x['downs']}, {x['direction_changes']}" if auto else "off") + " | "
              + (fmt_s(x['reached_max_after']) if auto else "n/a") + f" | {x['max_queue']} | "
              f"{x['master_ticks']} ticks ({x['master_cpu_ms']:.0f} ms) in {x['run_secs']:.0f} s | "
              f"{x['loadavg'][0]:.2f} -> {x['loadavg'][1]:.2f} |")
        w("")
        for x in r["step"]:
            if ".." in x["spec"] and x["events"]:
                w(f"- `-w {x['spec']}`, {x['low']} -> {x['high']} clients, scale steps (s from the step): "
                  + ", ".join(f"{e['t']:+.1f} {e['from']}->{e['to']}" for e in x["events"]))
        qs = [x for x in r["step"] if ".." in x["spec"]]
        for x in qs:
            w(f"- `-w {x['spec']}`, {x['low']} -> {x['high']} clients, queue samples (s from the step: queue, "
              "target): " + ", ".join(f"{s['t']:+.0f}: {s['queue']}/{s['target']}" for s in x["samples"]))
        w("")
        # How long the range took to do as well as fixed MAX.
        for high in cap.highs:
            ref = [x for x in r["step"] if x["high"] == high and ".." not in x["spec"]
                   and int(x["spec"]) == max(y["max"] for y in r["step"])]
            if not ref or ref[0]["high_last10"]["p99"] is None:
                continue
            ref_p99 = ref[0]["high_last10"]["p99"]
            for x in r["step"]:
                if x["high"] == high and ".." in x["spec"]:
                    m = [w_[0] for w_ in x["windows"] if w_[1] is not None and w_[1] <= 1.25 * ref_p99]
                    w(f"- With {high} clients, fixed {ref[0]['spec']} held p99 {fmt_ms(ref_p99)} over its last "
                      f"10 s; `-w {x['spec']}` first had a 1 s window within 1.25x of that "
                      f"({fmt_ms(1.25 * ref_p99)}) {fmt_s(m[0] if m else None)} after the step.")
        w("")
        w("Reading the table:")
        w("")
        mx = max(y["max"] for y in r["step"])
        for x in r["step"]:
            if x["high"] > mx and ".." not in x["spec"] and int(x["spec"]) == mx:
                w(f"- {x['high']} closed-loop clients are more than MAX = {mx} workers can hold: "
                  f"{x['high'] - mx} connections always wait (fixed {mx}: queue up to {x['max_queue']}, p99 "
                  f"{fmt_ms(x['high_last10']['p99'])} = {x['high']} x {SERVICE * 1000:.0f} ms / {mx}), so with "
                  f"{x['high']} clients no configuration can meet the 3x or the queue criterion; the 1.25x-of-"
                  f"fixed-{mx} line above is the comparison there.")
        for x in r["step"]:
            if ".." not in x["spec"]:
                continue
            ups = [e for e in x["events"] if e["t"] > 0 and e["to"] > e["from"]]
            if len(ups) >= 2:
                gaps = [b["t"] - a["t"] for a, b in zip(ups, ups[1:])]
                w(f"- `-w {x['spec']}`, {x['low']} -> {x['high']} clients: {len(ups)} steps up after the step, "
                  f"{median(gaps):.2f} s apart (median; the first {ups[0]['t']:.1f} s after the step): one worker "
                  "per second of queue, and each step restarts the window, so with samples every 250 ms a step "
                  f"takes about 1.25 s; MAX after {fmt_s(x['reached_max_after'])}.")
            if x["workers_at_step"] > x["min"]:
                w(f"- `-w {x['spec']}`: {x['low']} clients already queue on MIN = {x['min']} workers, so it "
                  f"had scaled to {x['workers_at_step']} before the step.")
            downs = [e for e in x["events"] if 0 < e["t"] <= x["high_secs"] and e["to"] < e["from"]]
            if downs:
                w(f"- `-w {x['spec']}`, {x['low']} -> {x['high']} clients: **it stepped down while the load was "
                  "unchanged** (" + ", ".join(f"{e['t']:+.1f} s {e['from']}->{e['to']}" for e in downs)
                  + f"), then up again; {x['direction_changes']} changes of direction in the run. With "
                  f"{x['high']} clients on {x['high']} workers every worker is busy but no connection waits, and "
                  "`slow_app.py` keeps no scoreboard, so the autoscaler judges by the queue alone: 10 s of an empty "
                  "queue is slack, the step down makes a queue, and a step up follows about 1.25 s later. "
                  "Measured as is; the daemon was not tuned.")
            fails = x["all"]["failed"]
            if fails:
                w(f"- `-w {x['spec']}`, {x['low']} -> {x['high']} clients: **{fails} failed requests** "
                  f"({x['all']['fail_kinds']}).")
        w("")
    if "sample" in r:
        sm = r["sample"]
        n = sm["n"]
        w(f"### One autoscaler sample at {n} idle workers")
        w("")
        w(f"The built-in worker, no COMMAND, {n} workers, no client. After boot and 3 s of settling, the "
          f"master's CPU over {sm['idle_secs']} s: utime+stime ticks from `/proc/PID/stat` ({CLK_TCK}/s; "
          "too coarse for this, so the nanoseconds of `/proc/PID/task/*/schedstat` are beside them) and its "
          f"voluntary context switches (its wakeups). `fixed`: `-w {n}`, the autoscaler off; `autoscale`: "
          f"`-w {n - 1}..{n} --max-workers {n}`, the autoscaler on and sampling every 250 ms "
          f"({sm['idle_secs'] * 4:.0f} samples) while idle at its lower bound ({n - 1} workers; slack cannot "
          "go below MIN). Runs alternate between the modes.")
        w("")
        w("| mode | run | ticks | CPU (schedstat) | wakeups | boot | workers after, ups/downs | load avg |")
        w("|---|---|---|---|---|---|---|---|")
        for d in sm["runs"]:
            a = d.get("autoscale")
            w(f"| {d['mode']} | {d['rep'] + 1} | {d['ticks']} | {d['cpu_ms']:.2f} ms | {d['wakeups']} | "
              f"{d['boot_secs']:.1f} s | {d['target_after']}, "
              + (f"{a['ups']}/{a['downs']}" if a else "off") + f" | {d['loadavg'][0]:.2f} -> {d['loadavg'][1]:.2f} |")
        fx = [d for d in sm["runs"] if d["mode"] == "fixed"]
        au = [d for d in sm["runs"] if d["mode"] == "autoscale"]
        if fx and au:
            samples = sm["idle_secs"] * 4
            dt = median([d["ticks"] for d in au]) - median([d["ticks"] for d in fx])
            dc = median([d["cpu_ms"] for d in au]) - median([d["cpu_ms"] for d in fx])
            dw = median([d["wakeups"] for d in au]) - median([d["wakeups"] for d in fx])
            w("")
            w(f"Medians, autoscale minus fixed: {dt:g} ticks ({dt * 1000 / CLK_TCK:.0f} ms), {dc:.2f} ms of "
              f"schedstat CPU, {dw:g} wakeups over {sm['idle_secs']} s; per sample ({samples:.0f}): "
              f"{dt * 1e6 / CLK_TCK / samples:.0f} us by ticks, **{dc * 1000 / samples:.0f} us** by schedstat, "
              f"{dw / samples:.2f} wakeups.")
        w("")
        w(f"The fixed master barely wakes in the window ({median([d['wakeups'] for d in fx]):g} wakeups, median); "
          "with a range it wakes 4 times a second, each wake a queue sample. The "
          "figure is the whole wakeup (timer, sample, decision, back to sleep) at this worker count; ticks are "
          "10 ms each, so the tick-based figure is only good to about +-10 ms / 120 = +-80 us per sample.")
        w("")
    if "python" in r:
        p = r["python"]
        w("### The same Python app under arbiterd and gunicorn")
        w("")
        w("`bench/gunicorn_app.py` (answers its pid) served by gunicorn's sync worker in both. gunicorn: "
          "`gunicorn -w N -k sync gunicorn_app:app`. arbiterd: each of its N workers is `gunicorn -c "
          "examples/gunicorn/gunicorn.conf.py gunicorn_app:app` (a gunicorn master with `workers = 1`, "
          "`preload_app`, the listener adopted from `LISTEN_FDS`) and `--ready notify`, as "
          "examples/gunicorn/README.md recommends. Both run on the same interpreter "
          f"(`{os.path.basename(PY)}`, gunicorn {gunicorn_version()}). *Serving*: a process that runs the app "
          "is blocked waiting for clients (`/proc/PID/syscall`): gunicorn's children; under arbiterd, the "
          "gunicorn workers (arbiterd's grandchildren; the gunicorn master waits in select too and is not "
          "counted).")
        w("")
        w("| | arbiterd + gunicorn per worker | gunicorn | gunicorn / arbiterd |")
        w("|---|---|---|---|")
        for n in cap.py_ns:
            a = [b for b in p["boot"] if b["kind"] == "arbiterd" and b["n"] == n]
            g = [b for b in p["boot"] if b["kind"] == "gunicorn" and b["n"] == n]
            if a and g:
                ma, mg = median([b["secs"] for b in a]), median([b["secs"] for b in g])
                w(f"| boot, launch until {n} serving (median; each, load avg) | {fmt_ms(ma)}; "
                  + ", ".join(f"{fmt_ms(b['secs'])} ({b['loadavg']:.2f})" for b in a) + f" | {fmt_ms(mg)}; "
                  + ", ".join(f"{fmt_ms(b['secs'])} ({b['loadavg']:.2f})" for b in g) + f" | {mg / ma:.2f}x |")
        a = [t for t in p["ttin"] if t["kind"] == "arbiterd"]
        g = [t for t in p["ttin"] if t["kind"] == "gunicorn"]
        if a and g:
            ma, mg = median([t["secs"] for t in a]), median([t["secs"] for t in g])
            w(f"| TTIN until the new worker serves, from 4 (median; each, load avg) | {fmt_ms(ma, 1)}; "
              + ", ".join(f"{fmt_ms(t['secs'], 1)} ({t['loadavg']:.2f})" for t in a) + f" | {fmt_ms(mg, 1)}; "
              + ", ".join(f"{fmt_ms(t['secs'], 1)} ({t['loadavg']:.2f})" for t in g) + f" | {mg / ma:.2f}x |")
        rl = p["reload"]
        if rl:
            x0 = rl[0]
            w("")
            w(f"Reload under load: 4 workers, {x0['clients']} closed-loop Python clients (`Connection: close`, "
              f"5 s timeout) for {x0['secs']} s, HUP to the master every 2 s ({x0['hups']} HUPs). A failure is a "
              "connection error, a timeout or a non-200 answer.")
            w("")
            w("| server | run | requests | failed | p50 / p99 | reloads done | load avg |")
            w("|---|---|---|---|---|---|---|")
            for i, x in enumerate(rl):
                fk = x["fail_kinds"]
                w(f"| {'arbiterd + gunicorn per worker' if x['kind'] == 'arbiterd' else 'gunicorn'} | "
                  f"{i // 2 + 1} | {x['requests']} | {x['failed']}"
                  + (f" ({', '.join(f'{k} {v}' for k, v in fk.items())})" if fk else "")
                  + f" | {fmt_ms(x['p50'])} / {fmt_ms(x['p99'])} | "
                  + (f"{x.get('reloads')}" if x["kind"] == "arbiterd" else "n/a (not counted)")
                  + f" | {x['loadavg'][0]:.2f} -> {x['loadavg'][1]:.2f} |")
        w("")
    if "python" in r:
        w("arbiterd's workers here are two Python processes each: a gunicorn master, exec'd, importing "
          "gunicorn and (preload) the app, then forking its one worker; gunicorn's TTIN forks its already-loaded "
          "master without an exec. So TTIN and boot compare the cost of a fresh Python + gunicorn per worker against "
          "a fork, not the two masters; the load generator (Python threads) shares the 2 cores with the "
          "servers, so requests per second are bounded by the machine, not by either master.")
        w("")
    if r["errors"]:
        w("### What failed to run")
        w("")
        for k, v in r["errors"].items():
            w(f"- {k}: {v}")
        w("")
    w("### Commands")
    w("")
    w("Each distinct command line the harness ran. Paths are relative to the repository root; the harness "
      "runs every command with `bench/` as its working directory (gunicorn imports `gunicorn_app` from "
      "there). `$PORT` is a free "
      "port, `$SOCK` a control socket in a fresh /tmp directory, `$PIDFILE` in the run's scratch directory; "
      "`-n cap$PORT` keeps every master's name, cgroup and default paths apart from anyone else's.")
    w("")
    w("```")
    for line, uses in cap.commands.items():
        w(f"# {', '.join(uses)}")
        w(line)
    w("```")
    w("")
    w(f"Total run time {r.get('took_secs', 0):.0f} s; raw data (every request window, queue sample and log "
      f"step) in `{os.path.relpath(cap.workdir, ROOT)}/results.json` (not committed).")
    return "\n".join(L)


def gunicorn_version():
    try:
        return subprocess.run([PY, "-c", "import gunicorn; print(gunicorn.__version__)"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except Exception:
        return "?"


def write_section(path, text):
    """Replace the section (its heading up to the next `## ` heading) or append it at
    the end (after bench/run.py's kept-marker, so run.py keeps it)."""
    with open(path) as f:
        old = f.read()
    lines = old.split("\n")
    start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
    body = text.rstrip("\n").split("\n")
    if start is None:
        new = old.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = lines[end:]
        new = "\n".join(lines[:start] + body + ([""] + tail if tail else [""]))
    with open(path, "w") as f:
        f.write(new)


SETTINGS = ("low", "low_secs", "high_secs", "specs", "highs", "sample_n", "idle_secs", "py_ns", "workdir")


def report_from(path, write):
    """Write the report again from a run's results.json (nothing is measured)."""
    import types
    with open(path) as f:
        d = json.load(f)
    cap = types.SimpleNamespace(r=d["results"], commands=d["commands"], **d["settings"])
    text = report(cap, d["command"])
    print(text)
    if write:
        write_section(RESULTS, text)
        log(f"wrote the section into {RESULTS} from {path}")


def main():
    global PROCS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated: step,sample,python (default all)")
    ap.add_argument("--quick", action="store_true", help="short windows, 256 workers for the sample cost")
    ap.add_argument("--specs", default="2..16,2,16", help="-w values for the step (default 2..16,2,16)")
    ap.add_argument("--low", type=int, default=4, help="clients before the step (default 4)")
    ap.add_argument("--high", default="64,16", help="clients after the step, comma-separated, a run each (default 64,16)")
    ap.add_argument("--low-secs", type=float, default=10)
    ap.add_argument("--high-secs", type=float, default=30)
    ap.add_argument("--sample-workers", type=int, default=1024)
    ap.add_argument("--sample-reps", type=int, default=2, help="runs of each mode (default 2)")
    ap.add_argument("--py-runs", type=int, default=2, help="boot and reload runs per server (default 2)")
    ap.add_argument("--ttin-trials", type=int, default=5)
    ap.add_argument("--reload-clients", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="put the report into bench/RESULTS.md")
    ap.add_argument("--report-from", metavar="RESULTS_JSON", help="only write the report again from a run's results.json")
    args = ap.parse_args()
    if args.report_from:
        report_from(args.report_from, args.write)
        return
    for path in (ARBITERD, ARBITERCTL):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} not found: cargo build --release --bins")
    cmd = ["python3", "bench/capacity.py"] + [a for a in sys.argv[1:] if a != "--write"]
    command = shlex.join(cmd + (["--write"] if args.write else []))

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    cap = Cap(args)
    PROCS = H.Processes()
    H.PROCS = PROCS
    log(f"scratch {os.path.relpath(cap.workdir, ROOT)}, sockets {cap.sockdir}")
    only = set(args.only.split(",")) if args.only else {"step", "sample", "python"}
    t = time.monotonic()
    try:
        for name, fn in (("step", cap.step), ("sample", cap.sample), ("python", cap.python)):
            if name in only:
                cap.section(name, fn)
    except KeyboardInterrupt:
        log("interrupted; killing every process started")
        PROCS.cleanup()
        shutil.rmtree(cap.sockdir, ignore_errors=True)
        sys.exit(130)
    finally:
        PROCS.cleanup()
        shutil.rmtree(cap.sockdir, ignore_errors=True)
    cap.r["took_secs"] = time.monotonic() - t
    with open(os.path.join(cap.workdir, "results.json"), "w") as f:
        json.dump({"results": cap.r, "commands": cap.commands, "command": command,
                   "settings": {k: getattr(cap, k) for k in SETTINGS}}, f, indent=1)
    text = report(cap, command)
    with open(os.path.join(cap.workdir, "capacity.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if args.write:
        write_section(RESULTS, text)
        log(f"wrote the section into {RESULTS}")
    log(f"done in {cap.r['took_secs']:.0f} s")
    if cap.r["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

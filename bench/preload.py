#!/usr/bin/env python3
"""Preloading: arbiterd --preload against gunicorn --preload, and both without it.

One WSGI application that costs about 50 MB to load (bench/preload_app.py), served
by N workers (N = 4 and 32) in four ways:

  arbiterd --preload   python3 -m arbiter_preload preload_app:app, forked from a
                       template per generation
  arbiterd             the same command without --preload: each worker loads it
  gunicorn --preload   the sync worker, the app loaded in gunicorn's master
  gunicorn             the sync worker, each worker loads it

For each: boot (launch until N distinct workers answer a burst of 2N concurrent
requests), memory once serving (PSS of every worker and the total PSS of every
process of the server, master and template included, from
/proc/PID/smaps_rollup), TTIN to serving (the signal until a new pid answers such
a burst), and a reload under load (HUP every 2 s for 10 s with a client
loop; failed requests, and whether the answers came from new code).

Stdlib only. Every server runs in its own session and is killed with it.
Usage: bench/preload.py [--counts 4,32] [--out PATH]   (from the repository root,
after `cargo build --release --bins`; gunicorn from `python3 -m pip install gunicorn`)
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ARBITERD = os.path.join(ROOT, "target", "release", "arbiterd")
PY = sys.executable


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(port, timeout=2.0):
    """One GET /: the JSON answer, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            return None
        return json.loads(body)
    except (OSError, ValueError):
        return None


def session_pids(sid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_for(what, probe, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = probe()
        if r:
            return r
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def burst(port, k):
    """k concurrent GET / (each on its own connection): the pids that answered.
    Concurrent, so that every worker gets one: sequential requests mostly go to
    whichever worker got the last one (it is back in accept first), which would
    measure the workers' accept fairness instead of when they serve."""
    pids = set()
    lock = threading.Lock()

    def one():
        j = get(port)
        if j:
            with lock:
                pids.add(j["pid"])

    threads = [threading.Thread(target=one) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pids


def distinct_pids(port, n, timeout=120):
    seen = set()

    def probe():
        seen.update(burst(port, 2 * n))
        return len(seen) >= n and seen

    return wait_for(f"{n} distinct workers", probe, timeout)


class Server:
    def __init__(self, kind, preload, n, port, workdir):
        self.kind, self.preload, self.n, self.port = kind, preload, n, port
        env = dict(os.environ, PYTHONPATH=f"{os.path.join(ROOT, 'python')}:{BENCH}",
                   PYTHONDONTWRITEBYTECODE="1")
        for k in list(env):
            if k.startswith(("LISTEN_", "ARBITER_")) or k == "NOTIFY_SOCKET":
                del env[k]
        if kind == "arbiterd":
            self.control = os.path.join(workdir, f"c{port}.sock")
            cmd = [ARBITERD, "-b", f"127.0.0.1:{port}", "-w", str(n), "--max-workers", "256",
                   "--control", self.control, "--ready", "notify", "--boot-timeout", "120",
                   "--name", f"bench{port}"]
            if preload:
                cmd.append("--preload")
            cmd += ["--", PY, "-m", "arbiter_preload", "preload_app:app"]
        else:
            cmd = [PY, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(n),
                   "--timeout", "120", "--graceful-timeout", "5", "preload_app:app"]
            if preload:
                cmd.insert(3, "--preload")
        self.log = open(os.path.join(workdir, f"{kind}-{preload}-{n}-{port}.log"), "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=BENCH, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def master(self):
        return self.proc.pid

    def kill(self):
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.log.close()


def measure(kind, preload, n, workdir):
    port = free_port()
    s = Server(kind, preload, n, port, workdir)
    try:
        pids = distinct_pids(port, n)
        boot = time.monotonic() - s.t0
        time.sleep(1.0)  # let the workers settle (first requests, gc)
        # The server's own session (master, template, gunicorn's workers) and the
        # workers wherever they are (arbiterd's lead sessions of their own).
        procs = set(session_pids(s.master())) | set(pids)
        worker_pss = [pss(p) for p in pids]
        total = sum(x for x in (pss(p) for p in procs) if x)
        # TTIN until a pid never seen answers.
        t = time.monotonic()
        os.kill(s.master(), signal.SIGTTIN)

        def new_pid():
            return burst(port, 2 * (n + 1)) - set(pids)

        wait_for("the TTIN worker", new_pid, 120)
        ttin = time.monotonic() - t
        # Reload under load: HUP every 2 s for 10 s.
        stats = {"ok": 0, "failed": 0, "loaded_by": set()}
        stop = threading.Event()

        def client():
            while not stop.is_set():
                j = get(port, timeout=10)
                if j:
                    stats["ok"] += 1
                    stats["loaded_by"].add(j["loaded_by"])
                else:
                    stats["failed"] += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        for th in threads:
            th.start()
        for _ in range(5):
            time.sleep(2)
            os.kill(s.master(), signal.SIGHUP)
        time.sleep(2)
        stop.set()
        for th in threads:
            th.join()
        return {
            "kind": kind, "preload": preload, "n": n, "boot_s": boot,
            "worker_pss_mb": statistics.median(x for x in worker_pss if x) / 2**20,
            "total_pss_mb": total / 2**20, "ttin_s": ttin,
            "reload_ok": stats["ok"], "reload_failed": stats["failed"],
            # Each reload that loads new code gives answers loaded by a new process.
            "loaders_seen": len(stats["loaded_by"]),
        }
    finally:
        s.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="4,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    workdir = os.path.join(BENCH, ".work", f"preload-{int(time.time())}")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.counts.split(",")]:
        for kind, preload in [("arbiterd", True), ("gunicorn", True),
                              ("arbiterd", False), ("gunicorn", False)]:
            r = measure(kind, preload, n, workdir)
            print(json.dumps(r), flush=True)
            rows.append(r)
    load = os.getloadavg()
    lines = [
        "| N | server | boot | PSS per worker | PSS total | TTIN to serving | reload under load: ok / failed | processes that loaded the code seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["kind"] + (" --preload" if r["preload"] else "")
        lines.append(
            f"| {r['n']} | {name} | {r['boot_s']:.2f} s | {r['worker_pss_mb']:.1f} MB | "
            f"{r['total_pss_mb']:.0f} MB | {r['ttin_s'] * 1000:.0f} ms | "
            f"{r['reload_ok']} / {r['reload_failed']} | {r['loaders_seen']} |"
        )
    lines.append("")
    lines.append(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

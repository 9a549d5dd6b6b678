#!/usr/bin/env python3
"""Two hardening episodes, before and after: the master's CPU time and log lines.

    python3 bench/episodes.py --baseline OLD/arbiterd --candidate NEW/arbiterd

1. EXTEND_TIMEOUT_USEC: a --ready notify worker asks for 3 s more at boot, says
   READY=1 2.5 s later (past --boot-timeout 2), then asks for 2 s more while ready
   (tests/workers/health_extend.py); measured over 6 s from the start.
2. EMFILE on the control socket: the master's open-files limit set to its lowest
   free fd number, two TTINs (their spawns fail), then five clients connected to
   the control socket and held open; measured over 3 s.

Each master runs in a scratch directory of its own, on a free port, and is killed
with its whole session at the end. Prints a markdown table.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        after = f.read().rsplit(")", 1)[1].split()
    return int(after[11]) + int(after[12])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(binary, args, scratch):
    log = open(os.path.join(scratch, "daemon.log"), "w")
    p = subprocess.Popen(
        [binary, "-b", f"127.0.0.1:{free_port()}", "--control", os.path.join(scratch, "c.sock")] + args,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return p


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def log_lines(scratch):
    with open(os.path.join(scratch, "daemon.log"), "rb") as f:
        return sum(1 for _ in f)


def wait_for(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def extend(binary):
    scratch = tempfile.mkdtemp(prefix="arbep-")
    worker = os.path.join(ROOT, "tests", "workers", "health_extend.py")
    p = start(binary, ["--ready", "notify", "--boot-timeout", "2", "-t", "2", "--", sys.executable, worker], scratch)
    try:
        wait_for(lambda: os.path.exists(os.path.join(scratch, "c.sock")), 10)
        c0 = cpu_ticks(p.pid)
        time.sleep(6)
        return cpu_ticks(p.pid) - c0, log_lines(scratch)
    finally:
        stop(p)
        shutil.rmtree(scratch, ignore_errors=True)


def first_free_fd(pid):
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    n = 0
    while n in used:
        n += 1
    return n


def emfile(binary):
    scratch = tempfile.mkdtemp(prefix="arbep-")
    p = start(binary, ["-w", "2"], scratch)
    clients = []
    try:
        sock = os.path.join(scratch, "c.sock")
        wait_for(lambda: os.path.exists(sock), 10)
        time.sleep(0.5)  # let the two workers boot before the limit is set
        limit = first_free_fd(p.pid)
        subprocess.run(["prlimit", "--pid", str(p.pid), f"--nofile={limit}:"], check=True)
        os.kill(p.pid, signal.SIGTTIN)
        os.kill(p.pid, signal.SIGTTIN)
        for _ in range(5):
            c = socket.socket(socket.AF_UNIX)
            c.connect(sock)
            clients.append(c)
        before = log_lines(scratch)
        c0 = cpu_ticks(p.pid)
        time.sleep(3)
        return cpu_ticks(p.pid) - c0, log_lines(scratch) - before
    finally:
        for c in clients:
            c.close()
        stop(p)
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--candidate", required=True)
    a = ap.parse_args()
    rows = []
    for name, fn, window in [("EXTEND_TIMEOUT_USEC (6 s)", extend, 6), ("EMFILE, 5 clients held (3 s)", emfile, 3)]:
        b = fn(a.baseline)
        c = fn(a.candidate)
        rows.append((name, window, b, c))
    print("| episode | baseline: master CPU, log lines | candidate: master CPU, log lines |")
    print("|---|---|---|")
    for name, window, b, c in rows:
        print(f"| {name} | {b[0] / 100:.2f} s of {window} s, {b[1]} lines | {c[0] / 100:.2f} s of {window} s, {c[1]} lines |")


if __name__ == "__main__":
    main()

"""Recycling under steady load: arbiterd --max-requests against gunicorn
--max-requests, the same WSGI app (bench/gunicorn_app.py), the same N and jitter,
2 workers each, both preloaded.

    bench/.venv/bin/python bench/recycle.py [--seconds 20] [--n 200] [--jitter 20]

(bench/run.sh creates bench/.venv with gunicorn; `cargo build --release --bins`
first.) CLIENTS threads loop on GET / (a new connection each) for SECONDS; the
"serving" count is sampled every 50 ms: for arbiterd, `ready` from its control
socket; for gunicorn, which has no readiness, its live non-zombie worker
processes (so a worker counts from its fork: generous to gunicorn). Prints a
Markdown table. stdlib only.
"""

import argparse, json, os, signal, socket, subprocess, sys, tempfile, threading, time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ARBITERD = os.path.join(ROOT, "target", "release", "arbiterd")
CLIENTS = 4
WORKERS = 2


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(port, timeout=5.0):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == ppid and fields[0] != "Z":
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def arbiter_status(sock):
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(2)
        c.connect(sock)
        c.sendall(b'{"v":1,"cmd":"status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return json.loads(data)["reply"]


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


def run(kind, args, workdir):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH, os.path.join(ROOT, "python")]),
               PYTHONDONTWRITEBYTECODE="1")
    sock = os.path.join(workdir, f"{kind}.sock")
    log = open(os.path.join(workdir, f"{kind}.log"), "w")
    mr = ["--max-requests", str(args.n), "--max-requests-jitter", str(args.jitter)]
    if kind == "arbiterd":
        cmd = [ARBITERD, "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--control", sock,
               "--preload", "--ready", "notify", *mr, "--",
               sys.executable, "-m", "arbiter_preload", "gunicorn_app:app"]
    else:
        cmd = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}",
               "--preload", *mr, "gunicorn_app:app"]
    p = subprocess.Popen(cmd, cwd=BENCH, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not get(port, 1.0):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"{kind} did not serve; see {log.name}")
            time.sleep(0.05)

        def serving():
            if kind == "arbiterd":
                return arbiter_status(sock)["master"]["ready"]
            return len(children(p.pid))

        stop = threading.Event()
        lat, failed, lock = [], [0], threading.Lock()

        def client():
            mine, bad = [], 0
            while not stop.is_set():
                t = time.perf_counter()
                ok = get(port)
                mine.append(time.perf_counter() - t)
                bad += not ok
            with lock:
                lat.extend(mine)
                failed[0] += bad

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        samples = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            samples.append(serving())
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        if kind == "arbiterd":
            recycles = arbiter_status(sock)["master"]["recycles"].get("max-requests", 0)
        else:
            log.flush()
            with open(log.name) as f:
                recycles = f.read().count("Autorestarting worker")
        return {
            "kind": kind, "requests": len(lat), "failed": failed[0],
            "rps": len(lat) / args.seconds,
            "p50": percentile(lat, 0.5) * 1e3, "p99": percentile(lat, 0.99) * 1e3,
            "max": max(lat) * 1e3, "recycles": recycles,
            "min_serving": min(samples),
            "below": sum(s < WORKERS for s in samples) / len(samples) * 100,
            "samples": len(samples),
        }
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--jitter", type=int, default=20)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="recycle-", dir=os.path.join(BENCH, ".work")
                               if os.path.isdir(os.path.join(BENCH, ".work")) else None)
    rows = [run(k, args, workdir) for k in ("arbiterd", "gunicorn")]
    print(f"{WORKERS} workers, --max-requests {args.n} --max-requests-jitter {args.jitter}, "
          f"--preload, {CLIENTS} looping clients for {args.seconds:g} s, one run; logs in {workdir}\n")
    print("| server | requests | failed | req/s | p50 ms | p99 ms | max ms | recycles "
          "| serving min | samples below 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['requests']} | {r['failed']} | {r['rps']:.0f} | {r['p50']:.2f} "
              f"| {r['p99']:.2f} | {r['max']:.1f} | {r['recycles']} | {r['min_serving']} "
              f"| {r['below']:.1f}% of {r['samples']} |")


if __name__ == "__main__":
    main()

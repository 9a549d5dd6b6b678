#!/usr/bin/env python3
"""arbiterd --preload from the master's side: launch until 2 workers are ready,
and TTIN until the new worker is ready, by polling `arbiterctl status --json`
(no HTTP probe, so no accept race between workers skews it). Run from the
repository root after `cargo build --release --bins`:

    python3 bench/preload_ready.py
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARBITERD = os.path.join(ROOT, "target", "release", "arbiterd")
ARBITERCTL = os.path.join(ROOT, "target", "release", "arbiterctl")


def main():
    tmp = tempfile.mkdtemp(prefix="arbpl")
    control = os.path.join(tmp, "c.sock")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}/python:{ROOT}/bench", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    p = subprocess.Popen(
        [ARBITERD, "--preload", "-w", "2", "--ready", "notify", "-b", f"127.0.0.1:{port}",
         "--control", control, "--name", f"pl{port}", "--",
         "python3", "-m", "arbiter_preload", "preload_app:app"],
        env=env, stdout=open(os.path.join(tmp, "log"), "w"), stderr=subprocess.STDOUT,
        start_new_session=True)

    def status():
        out = subprocess.run([ARBITERCTL, "--control", control, "--json", "status"],
                             capture_output=True, text=True).stdout
        return json.loads(out) if out.strip() else None

    try:
        while True:
            st = status()
            if st and st.get("master", {}).get("ready") == 2:
                break
            time.sleep(0.005)
        print(f"launch to 2 workers ready: {(time.monotonic() - t0) * 1000:.0f} ms")
        for _ in range(5):
            before = {w["pid"] for w in status()["workers"]}
            t = time.monotonic()
            os.kill(p.pid, signal.SIGTTIN)
            while True:
                new = [w for w in status()["workers"] if w["pid"] not in before]
                if new and new[0]["state"] == "ready":
                    break
                time.sleep(0.005)
            print(f"TTIN to ready: {(time.monotonic() - t) * 1000:.0f} ms")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


if __name__ == "__main__":
    main()

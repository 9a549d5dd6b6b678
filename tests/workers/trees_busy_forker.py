"""A worker with serving children of its own: it forks two children that burn a
little CPU and sleep, then waits for them, as a server with its own worker
processes does."""

import os
import time

kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        until = time.monotonic() + 0.3
        while time.monotonic() < until:
            pass
        while True:
            time.sleep(1000)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)

"""A worker that starts a daemon the classic way: fork, setsid, fork again, the
intermediate exits, so the daemon is in neither the worker's process group nor
its session, and is re-parented. The daemon's pid goes into the file named by
argv[1]; the worker itself then idles, beating on its heartbeat fd."""

import os
import sys
import time

first = os.fork()
if first == 0:
    os.setsid()
    second = os.fork()
    if second == 0:
        with open(sys.argv[1], "a") as f:
            f.write(f"{os.getpid()}\n")
        while True:
            time.sleep(1000)
    os._exit(0)
os.waitpid(first, 0)
while True:
    time.sleep(1000)

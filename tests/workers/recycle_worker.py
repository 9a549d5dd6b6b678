"""A worker for tests/recycle.rs that serves nothing: it says READY=1 and then
either counts "requests" on the scoreboard at a steady 100 a second from its
start (`count`: every worker the same, so only the jitter tells their limits
apart), or, for the first worker to take MARKER, asks to be recycled once
(`ask MARKER`) with the Python helper. It leaves on SIGTERM."""

import os, signal, sys, time

from arbiter_preload.scoreboard import Scoreboard
from arbiter_preload.worker_env import notify, recycle

RATE = 100

stop = False


def on_term(_sig, _frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
board = Scoreboard()
notify(f"READY=1\nSTATUS=pid {os.getpid()}")
if sys.argv[1] == "ask":
    try:
        fd = os.open(sys.argv[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        if not recycle():
            sys.exit("recycle() could not send")
    except FileExistsError:
        pass
start = time.monotonic()
while not stop:
    if sys.argv[1] == "count" and board._state is not None:
        board._requests.value = int((time.monotonic() - start) * RATE)
    time.sleep(0.01)

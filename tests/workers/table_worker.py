"""A `--ready notify` COMMAND worker for tests/table.rs; argv[1] says what it does:

  status TEXT      READY=1 and STATUS=TEXT, then WATCHDOG=1 every 0.2 s.
  beat-until FLAG  READY=1, WATCHDOG=1 every 0.1 s until the file FLAG exists,
                   then silence (its heartbeat goes stale).
  burn             READY=1; the worker in slot 0 spins on the CPU, the others sleep.

It never answers on its listener. TERM keeps its default action.
"""

import os
import socket
import sys
import time


def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(msg.encode(), addr)
    finally:
        s.close()


mode = sys.argv[1]
notify("READY=1")
if mode == "status":
    notify("STATUS=" + sys.argv[2])
    while True:
        notify("WATCHDOG=1")
        time.sleep(0.2)
elif mode == "beat-until":
    while not os.path.exists(sys.argv[2]):
        notify("WATCHDOG=1")
        time.sleep(0.1)
    while True:
        time.sleep(3600)
elif mode == "burn":
    if os.environ.get("ARBITER_SLOT") == "0":
        n = 0
        while True:
            n += 1
    while True:
        time.sleep(3600)
else:
    sys.exit("unknown mode " + mode)

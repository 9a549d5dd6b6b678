"""A worker that heartbeats by writing into ARBITER_HEARTBEAT_FD (as some ported
gunicorn workers do): 4 KiB every millisecond for 3 s, then one byte every
100 ms. The flag file named by argv[1] appears when the fast part is over."""

import os
import sys
import time

fd = int(os.environ["ARBITER_HEARTBEAT_FD"])
chunk = b"." * 4096
until = time.monotonic() + 3
while time.monotonic() < until:
    os.write(fd, chunk)
    time.sleep(0.001)
open(sys.argv[1], "w").close()
while True:
    os.write(fd, b".")
    time.sleep(0.1)

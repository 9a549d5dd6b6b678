"""A worker that writes `tick N (pid P)` to stdout, alternately to stderr, every 0.1 s
(the master relays both into its log)."""

import os
import sys
import time

pid = os.getpid()
n = 0
while True:
    out = sys.stdout if n % 2 == 0 else sys.stderr
    print(f"tick {n} (pid {pid})", file=out, flush=True)
    n += 1
    time.sleep(0.1)

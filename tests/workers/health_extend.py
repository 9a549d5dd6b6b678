"""--ready notify worker that asks for more time: EXTEND_TIMEOUT_USEC=3 s at once,
READY=1 2.5 s later (past a 2 s --boot-timeout, within the extension), then
another 2 s extension while ready. It never heartbeats. The sleeps are the
worker's behaviour under test, not a test's way of waiting."""

import time

from health_lib import notify

notify("EXTEND_TIMEOUT_USEC=3000000")
time.sleep(2.5)
notify("READY=1")
time.sleep(0.2)
notify("EXTEND_TIMEOUT_USEC=2000000\nSTATUS=extended while ready")
while True:
    time.sleep(1000)

"""--ready notify worker that heartbeats only through sd_notify (never touches
ARBITER_HEARTBEAT_FD). argv[1]:
  ping_then_stop  WATCHDOG=1 every 0.1 s for 2 s, then silence;
  trigger         one WATCHDOG=1, then WATCHDOG=trigger after 0.3 s, then silence."""

import sys
import time

from health_lib import notify

notify("READY=1")
if sys.argv[1] == "ping_then_stop":
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        notify("WATCHDOG=1")
        time.sleep(0.1)
    notify("STATUS=silent now")
else:
    notify("WATCHDOG=1")
    time.sleep(0.3)
    notify("WATCHDOG=trigger")
while True:
    time.sleep(1000)

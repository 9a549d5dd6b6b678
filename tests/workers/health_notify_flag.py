"""--ready notify worker: says STATUS=waiting for the flag, waits until the file named
by argv[1] exists, then sends READY=1 and idles. It never heartbeats."""

import os
import sys
import time

from health_lib import notify

flag = sys.argv[1]
notify("STATUS=waiting for the flag")
while not os.path.exists(flag):
    time.sleep(0.02)
notify("STATUS=flag seen\nREADY=1")
while True:
    time.sleep(1000)

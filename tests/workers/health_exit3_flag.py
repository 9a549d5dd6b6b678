"""--ready notify worker: exits 3 (boot error) at once when the file named by argv[1]
exists; otherwise sends READY=1 and idles."""

import os
import sys
import time

from health_lib import notify

if os.path.exists(sys.argv[1]):
    sys.exit(3)
notify("READY=1")
while True:
    time.sleep(1000)

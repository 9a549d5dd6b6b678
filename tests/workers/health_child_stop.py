"""A heartbeating worker with a child: starts `sleep 1000` (same process group), writes
the child's pid to the file named by argv[1], then beats every 0.1 s forever. The
test SIGSTOPs this process: the heartbeat stops, the child must die with it."""

import os
import subprocess
import sys
import time

from health_lib import beat

child = subprocess.Popen(["sleep", "1000"])
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(child.pid))
os.rename(tmp, sys.argv[1])
while True:
    beat()
    time.sleep(0.1)

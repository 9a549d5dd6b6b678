"""A worker that makes orphans: 50 times, a child forks a grandchild and exits at
once, so the grandchild is re-parented (to the master as subreaper, or to the
init of a PID namespace) and exits 10 ms later. Then it touches the file named by
argv[1] plus its pid, and idles."""

import os
import sys
import time

for _ in range(50):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(0.01)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
open(f"{sys.argv[1]}.{os.getpid()}", "w").close()
while True:
    time.sleep(1000)

"""A worker that serves HTTP on fd 3 itself and has a child that ignores TERM and
keeps the listening socket open, as a forgotten helper process would. It writes
the child's pid into the file named by argv[1] (one line per worker)."""

import os
import signal
import socket
import sys
import time

child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1000)
with open(sys.argv[1], "a") as f:
    f.write(f"{child}\n")
lsock = socket.socket(fileno=3)
while True:
    conn, _ = lsock.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.close()

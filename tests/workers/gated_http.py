"""An HTTP worker on fd 3 that accepts nothing until a gate file exists.

argv[1]: the gate file. Until it exists, connections wait in the listener's accept
queue (the kernel completes their handshakes), which is how the tests fill the
queue on purpose. Once it exists, each request is answered `200 ok` and closed.
"""

import os
import socket
import sys
import time

gate = sys.argv[1]
listener = socket.socket(fileno=3)
while True:
    while not os.path.exists(gate):
        time.sleep(0.02)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            pass

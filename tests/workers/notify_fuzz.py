"""A worker that floods the master's NOTIFY_SOCKET with mutated sd_notify
datagrams (random bytes, broken keys, huge and control-character STATUS, stray
file descriptors attached), half from itself and half from a child, then says
READY=1 and STATUS=fuzzed N, S sent by the parent and waits for TERM. argv[1]: seed, argv[2]: count."""

import os
import random
import signal
import socket
import sys

seed, count = int(sys.argv[1]), int(sys.argv[2])
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]

# Nothing that would end this worker: no WATCHDOG=trigger, no STOPPING=1.
TOKENS = [b"READY=1", b"READY=0", b"WATCHDOG=1", b"STATUS=", b"EXTEND_TIMEOUT_USEC=",
          b"ERRNO=", b"MAINPID=", b"FDSTORE=1", b"RELOADING=1", b"=", b"\n", b"\0",
          b"\xff\xfe", b"\x1b[31m", b"18446744073709551615", b"-1", b"USEC="]


def datagram(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 1:
        return b"STATUS=" + bytes(rng.randrange(1, 256) for _ in range(rng.randrange(4000)))
    parts = [rng.choice(TOKENS) for _ in range(rng.randrange(1, 8))]
    if rng.randrange(2):
        parts.append(str(rng.randrange(10**12)).encode())
    return b"".join(parts)


def flood(rng, n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r, w = os.pipe()
    sent = 0
    for _ in range(n):
        d = datagram(rng)
        try:
            if rng.randrange(8) == 0:
                socket.send_fds(s, [d], [r, w], 0, addr)
            else:
                s.sendto(d, addr)
            sent += 1
        except BlockingIOError:
            pass
        except OSError:
            # A full receive queue (EAGAIN) or an oversize datagram: the flood goes on.
            pass
    return sent


rng = random.Random(seed)
half = count // 2
pid = os.fork()
if pid == 0:
    flood(random.Random(seed + 1), half)
    os._exit(0)
sent = flood(rng, count - half)
os.waitpid(pid, 0)

s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(f"READY=1\nSTATUS=fuzzed {count}, {sent} sent by the parent".encode(), addr)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    signal.pause()

"""Shared bits of the health_* test workers: sd_notify and the heartbeat, the way a
user would write them from docs/workers.md (no library)."""

import os
import socket


def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(msg.encode(), addr)
    finally:
        s.close()


def beat():
    os.fchmod(int(os.environ["ARBITER_HEARTBEAT_FD"]), 0o600)

"""What a worker gets from arbiterd and how it talks back (docs/workers.md):
the listening sockets, sd_notify on NOTIFY_SOCKET, the heartbeat file."""

import os
import signal
import socket
import time

SD_LISTEN_FDS_START = 3
EX_CONFIG = 78


# Signals meant for the master, which by default kill (HUP, USR1, USR2) or stop
# (TTIN, TTOU) a process that does not handle them: they reach workers too when
# an operator signals every process of a unit (`systemctl kill` without
# `--kill-whom=main`, `pkill -HUP -f app`).
MASTERS_SIGNALS = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def ignore_masters_signals():
    for sig in MASTERS_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def notify(message):
    """One datagram to NOTIFY_SOCKET (`@name`: the abstract namespace). False if
    there is no socket or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.sendto(message.encode(), address)
        return True
    except OSError:
        return False
    finally:
        s.close()


def recycle():
    """Ask arbiterd to replace this worker (`ARBITER_RECYCLE=1`): it starts a
    replacement and, once that one is ready, stops this one gracefully (SIGTERM),
    as for --max-requests. For a worker that counts its own requests, memory or
    errors. False if there is no NOTIFY_SOCKET or the send failed."""
    return notify("ARBITER_RECYCLE=1")


def listen_fds():
    """The number of listeners at fds 3, 4, ... meant for this process (0 if
    LISTEN_PID names another process)."""
    pid = os.environ.get("LISTEN_PID")
    if pid is not None and pid != str(os.getpid()):
        return 0
    try:
        return int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return 0


class Heartbeat:
    """Changes the ctime of ARBITER_HEARTBEAT_FD (fchmod) at most every `period`
    seconds; `beat()` is cheap to call from every turn of a serving loop. Without
    a heartbeat fd, a no-op."""

    def __init__(self, period=0.5):
        try:
            self.fd = int(os.environ["ARBITER_HEARTBEAT_FD"])
        except (KeyError, ValueError):
            self.fd = None
        self.period = period
        self.last = 0.0

    def beat(self, force=False):
        if self.fd is None:
            return
        now = time.monotonic()
        if not force and now - self.last < self.period:
            return
        self.last = now
        try:
            os.fchmod(self.fd, 0o600)  # any chmod changes the ctime
        except OSError:
            self.fd = None  # gone: nothing more to beat on

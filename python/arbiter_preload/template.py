"""The template side of arbiterd's `--preload` protocol, version 1
(docs/workers.md, "Preloading: a template that forks workers").

The template has loaded the application; it says `READY 1` on the socket named by
ARBITER_TEMPLATE_FD and then, for each `FORK <id>` datagram, forks twice: the
middle process forks the worker, writes its pid to a pipe and exits at once, so
the worker is re-parented to the master (a child subreaper), which reaps it like
any worker. The template answers `FORKED <id> <pid>` or `FAILED <id> <reason>`.
"""

import array
import ctypes
import os
import signal
import socket
import sys
import time

from .worker_env import ignore_masters_signals

PROTOCOL = 1
ENV_TEMPLATE_FD = "ARBITER_TEMPLATE_FD"
MAX_FDS = 4  # stdio, heartbeat, scoreboard, cgroup
MAX_MESSAGE = 65536
# Signals held off across the fork, so that neither the middle process nor the
# worker ever runs the template's handlers; the worker unblocks them once its own
# are installed.
HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}


class ForkRequest:
    def __init__(self, worker_id, env, fds):
        self.worker_id = worker_id
        self.env = env  # [(key, value)] in order
        self.fds = fds  # {name: fd}, received in the template


class ProtocolError(Exception):
    pass


def _exit_now(signum, frame):
    os._exit(0)


def template_socket():
    """The socket to the master, or None when not started as a template."""
    value = os.environ.get(ENV_TEMPLATE_FD)
    if value is None:
        return None
    fd = int(value)
    os.set_inheritable(fd, False)  # never into what the application runs
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)  # its own end: it waits for work
    return sock


def parse_fork(data, fds):
    """A FORK datagram and the fds that came with it -> ForkRequest. On a
    ProtocolError the caller closes the fds."""
    lines = data.decode("utf-8").split("\n")
    first = lines[0].split(" ")
    if len(first) != 2 or first[0] != "FORK" or not first[1]:
        raise ProtocolError(f"not a FORK: {lines[0][:80]!r}")
    worker_id = first[1]
    env, names = [], None
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ProtocolError(f"bad line {line[:80]!r}")
        if key == "FDS":
            names = value.split(",") if value else []
        else:
            env.append((key, value))
    if names is None:
        raise ProtocolError("no FDS line")
    if len(names) != len(fds):
        raise ProtocolError(f"FDS names {len(names)} fds, {len(fds)} came")
    if "stdio" not in names or "heartbeat" not in names:
        raise ProtocolError("FDS without stdio or heartbeat")
    return ForkRequest(worker_id, env, dict(zip(names, fds)))


def receive(sock):
    """(data, fds) of one datagram; (b"", []) at EOF."""
    fd_size = array.array("i").itemsize
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fd_size), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fd_size
            fds.frombytes(payload[:usable])
    fds = list(fds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            _close(fd)
        raise ProtocolError("truncated message or fds")
    return data, fds


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _send(sock, line):
    sock.send(line.encode())


PR_SET_PDEATHSIG = 1


def _die_with_master(wait=1.0):
    """PR_SET_PDEATHSIG=SIGKILL, as an exec'd worker has, once this process is
    the master's child. The flag is about the parent of the moment, so first wait
    for the middle process to exit and the re-parenting to the master (a child
    subreaper). Waiting for the parent to be the master, not for it to stop being
    the middle process: the middle may be gone before this runs, and then the
    parent read at the start is the master already (under load, the common case;
    a wait on it ran out its whole second)."""
    master = os.environ.get("ARBITER_MASTER_PID")
    if master is None:
        return
    deadline = time.monotonic() + wait
    while str(os.getppid()) != master and time.monotonic() < deadline:
        time.sleep(0.001)  # the middle process exits right after the pid is written
    if str(os.getppid()) != master:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != master:
        os._exit(0)  # the master died in between


def become_worker(req, sock, prepare_and_serve):
    """In the worker (the grandchild): the steps of docs/workers.md, then
    `prepare_and_serve()`, whose return value is the exit status. Never returns."""
    status = 1
    try:
        os.setsid()  # 1. its own session and process group
        cgroup = req.fds.pop("cgroup", None)  # 2. its own cgroup
        if cgroup is not None:
            os.write(cgroup, b"0")
            os.close(cgroup)
        # 3. The fds to their numbers. The template socket goes first: its number
        # may be one of the targets (the master puts the heartbeat there). The
        # received fds are moved above every target before the dup2s, so none is
        # overwritten before it is placed.
        sock.close()
        env = dict(req.env)
        targets = {"stdio": [1, 2], "heartbeat": [int(env["ARBITER_HEARTBEAT_FD"])]}
        if "scoreboard" in req.fds:
            targets["scoreboard"] = [int(env["ARBITER_SCOREBOARD_FD"])]
        floor = max(n for ns in targets.values() for n in ns) + 1
        moved = {}
        for name, fd in req.fds.items():
            moved[name] = _dup_above(fd, floor)
            os.close(fd)
        for name, fd in moved.items():
            for target in targets.get(name, []):
                os.dup2(fd, target, inheritable=True)
            os.close(fd)
        # 4. The environment, and LISTEN_PID (and WATCHDOG_PID) for this process.
        os.environ.pop(ENV_TEMPLATE_FD, None)
        for key, value in req.env:
            os.environ[key] = value
        os.environ["LISTEN_PID"] = str(os.getpid())
        if "WATCHDOG_USEC" in os.environ:
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        else:
            os.environ.pop("WATCHDOG_PID", None)
        # As an exec'd worker: KILL when the master dies. Only once re-parented
        # to it (the flag is about the parent of the moment).
        _die_with_master()
        # 5. The post-fork hook and serving: the caller's.
        status = prepare_and_serve()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status if isinstance(status, int) else 0)


def _dup_above(fd, floor):
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def fork_worker(req, sock, prepare_and_serve):
    """The double fork. Returns the worker's pid; raises OSError or ProtocolError."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()  # close-on-exec; the middle process writes the pid into it
    try:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        try:
            middle = os.fork()
            if middle == 0:
                # The middle process: fork the worker, say its pid, leave at once.
                code = 1
                try:
                    os.close(r)
                    pid = os.fork()
                    if pid == 0:
                        os.close(w)
                        become_worker(req, sock, lambda: prepare_and_serve(old_mask))
                    os.write(w, str(pid).encode())
                    code = 0
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(w)
            w = None
        _, status = os.waitpid(middle, 0)
        os.set_blocking(r, False)
        try:
            data = os.read(r, 64)
        except BlockingIOError:
            data = b""
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    if not data:
        code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        raise ProtocolError(f"the middle process failed (status {code}) before the worker's pid")
    return int(data)


def run(sock, prepare_and_serve):
    """The template's loop, after READY. `prepare_and_serve(old_mask)` runs in
    each worker. Returns the template's exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, _exit_now)
    ignore_masters_signals()  # its workers inherit this until they set their own
    _send(sock, f"READY {PROTOCOL}")
    while True:
        try:
            data, fds = receive(sock)
        except ProtocolError as e:
            print(f"arbiter_preload: template: {e}", file=sys.stderr)
            continue
        except ConnectionResetError:
            return 0
        if not data and not fds:
            return 0  # EOF: the master is gone
        first = data.split(b"\n", 1)[0].decode("utf-8", "replace")
        worker_id = first.split(" ")[1] if first.startswith("FORK ") else "?"
        try:
            req = parse_fork(data, fds)
            pid = fork_worker(req, sock, prepare_and_serve)
            reply = f"FORKED {req.worker_id} {pid}"
        except (OSError, ProtocolError, ValueError, UnicodeDecodeError) as e:
            reason = str(e).replace("\n", " ") or type(e).__name__
            reply = f"FAILED {worker_id} {reason}"
            print(f"arbiter_preload: template: cannot fork worker {worker_id}: {reason}", file=sys.stderr)
        finally:
            for fd in fds:
                _close(fd)
        try:
            _send(sock, reply)
        except (BrokenPipeError, ConnectionResetError):
            return 0

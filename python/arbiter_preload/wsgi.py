"""A sync WSGI server for one arbiterd worker: one connection at a time from the
listeners it inherited (fds 3, 4, ...), HTTP/1.1 with `Connection: close` after
each response, responses written by `wsgiref.handlers`.

The listeners are shared with every sibling and stay in blocking mode (O_NONBLOCK
belongs to the open file description, which all of them share: docs/workers.md,
"O_NONBLOCK on shared listeners"). So the loop polls them (at most 0.5 s, to beat
the heartbeat while idle) and the accept that follows is bounded: a 10 ms interval
timer interrupts an `accept4()` whose connection a sibling took in between, as the
built-in worker does. The accept is made through ctypes so that its EINTR comes
back as a return value: a Python exception raised from the SIGALRM handler could
land just after a successful accept and lose the connection. EAGAIN (a listener a
previous program left non-blocking) means the same: poll again.

TERM: finish the request in hand, then serve what already waits in the listeners'
accept queues (at most as many as they held, read from the kernel's tcp_info;
DRAIN_UNKNOWN on a unix socket), then exit 0: once the last process holding a
socket closes it, whatever waits there is reset. QUIT, INT: exit at once. The
master's own signals (HUP, USR1, USR2, WINCH, TTIN, TTOU) are ignored: an
operator who signals every process of the unit meant them for the master.
"""

import ctypes
import errno
import io
import os
import select
import signal
import socket
import struct
import sys
import time
from urllib.parse import unquote_to_bytes
from wsgiref.handlers import SimpleHandler

from .scoreboard import Scoreboard
from .worker_env import Heartbeat, ignore_masters_signals, notify

SERVER_SOFTWARE = "arbiter_preload"
MAX_HEAD = 64 * 1024  # request line and headers
HEAD_TIMEOUT = 10.0  # to receive them, from the accept
IO_TIMEOUT = 30.0  # each read of the body and each write of the response
POLL = 0.5  # the longest wait on the listeners: the heartbeat period while idle
ACCEPT_BOUND = 0.01  # the interval timer that cuts short a lost accept
STATUS_EVERY = 5.0  # seconds between STATUS= updates (when the count changed)
DRAIN_UNKNOWN = 64  # connections served on TERM from a queue whose length is unknown

_RETRY_ACCEPT = {
    errno.EINTR,
    errno.EAGAIN,
    errno.EWOULDBLOCK,
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,  # a firewall refused it
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}
_NO_ROOM = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

_libc = ctypes.CDLL(None, use_errno=True)
_accept4 = _libc.accept4
_accept4.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_accept4.restype = ctypes.c_int


class Stop:
    """Set by the TERM handler: finish the request in hand, then leave."""

    requested = False


def on_term(signum, frame):
    Stop.requested = True


def on_quit(signum, frame):
    os._exit(0)


def _ignore(signum, frame):
    pass


def install_signals():
    """TERM: a graceful stop; INT and QUIT: at once; the master's own ignored."""
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_quit)
    signal.signal(signal.SIGQUIT, on_quit)
    ignore_masters_signals()


def queued(listener):
    """Connections waiting in a TCP listener's accept queue (tcpi_unacked of
    tcp_info, at offset 24), or None when that cannot be read."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return struct.unpack_from("I", info, 24)[0]
    except (OSError, struct.error):
        return None


def accept_bounded(fd):
    """A connection from listener `fd`, or None when there was none after all
    (a sibling took it, the timer went off, a signal came)."""
    signal.setitimer(signal.ITIMER_REAL, ACCEPT_BOUND, ACCEPT_BOUND)
    try:
        n = _accept4(fd, None, None, socket.SOCK_CLOEXEC)
        err = ctypes.get_errno()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if n >= 0:
        return socket.socket(fileno=n)
    if err in _RETRY_ACCEPT:
        return None
    if err in _NO_ROOM:
        print(f"arbiter_preload: accept: {os.strerror(err)}", file=sys.stderr)
        time.sleep(0.1)
        return None
    raise OSError(err, os.strerror(err))


class BadRequest(Exception):
    def __init__(self, status, why=""):
        super().__init__(why or status)
        self.status = status


class _Reader(io.RawIOBase):
    """The request body: what came with the head first, then the socket, at most
    `limit` bytes (None: until EOF)."""

    def __init__(self, sock, prefix, limit):
        self.sock, self.prefix, self.limit = sock, prefix, limit

    def readable(self):
        return True

    def readinto(self, b):
        want = len(b) if self.limit is None else min(len(b), self.limit)
        if want <= 0:
            return 0
        if self.prefix:
            chunk, self.prefix = self.prefix[:want], self.prefix[want:]
        else:
            chunk = self.sock.recv(want)
        b[: len(chunk)] = chunk
        if self.limit is not None:
            self.limit -= len(chunk)
        return len(chunk)


def _dechunk(reader, max_size=1 << 30):
    """A chunked request body, read whole."""
    out = io.BytesIO()
    while True:
        line = reader.readline(1024)
        if not line.endswith(b"\n"):
            raise BadRequest("400 Bad Request", "bad chunk size line")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("400 Bad Request", "bad chunk size")
        if size == 0:
            while reader.readline(MAX_HEAD) not in (b"\r\n", b"\n", b""):
                pass  # trailers: dropped
            break
        if out.tell() + size > max_size:
            raise BadRequest("413 Payload Too Large")
        data = reader.read(size)
        if len(data) != size:
            raise BadRequest("400 Bad Request", "truncated chunk")
        out.write(data)
        reader.readline(3)  # the CRLF after the chunk
    length = out.tell()
    out.seek(0)
    return out, length


def read_head(conn, beat):
    """(head, the bytes that came after it), or None if the client closed first."""
    data = b""
    deadline = time.monotonic() + HEAD_TIMEOUT
    conn.settimeout(1.0)  # the accepted socket is this process's own
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise BadRequest("431 Request Header Fields Too Large")
        if time.monotonic() > deadline:
            raise BadRequest("408 Request Timeout")
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            beat()
            continue
        if not chunk:
            if data:
                raise BadRequest("400 Bad Request", "incomplete head")
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def build_environ(head, conn, peer, listener):
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("400 Bad Request", "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("505 HTTP Version Not Supported")
    if not method or not method.isalpha() or not method.isupper():
        raise BadRequest("400 Bad Request", "bad method")
    if target.startswith("http://") or target.startswith("https://"):
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.partition("#")[0],
        "SERVER_PROTOCOL": version,
        "RAW_URI": target,
    }
    try:
        name = listener.getsockname()
    except OSError:
        name = None
    if isinstance(name, tuple):
        environ["SERVER_NAME"], environ["SERVER_PORT"] = str(name[0]), str(name[1])
    else:
        environ["SERVER_NAME"], environ["SERVER_PORT"] = str(name or "localhost"), "0"
    if isinstance(peer, tuple):
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(peer[0]), str(peer[1])
    else:
        environ["REMOTE_ADDR"] = str(peer or "")
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise BadRequest("400 Bad Request", "obsolete line folding")
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            raise BadRequest("400 Bad Request", "bad header")
        if "_" in key:
            continue  # would be confused with a dash once in the environ
        value = value.strip(" \t")
        key = key.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if key in environ and environ[key] != value:
                raise BadRequest("400 Bad Request", f"two {key}")
            environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + value if key in environ else value
    if "HTTP_HOST" in environ:
        host = environ["HTTP_HOST"]
        if host.startswith("["):
            environ["SERVER_NAME"] = host.partition("]")[0] + "]"
        else:
            environ["SERVER_NAME"] = host.partition(":")[0]
    return environ


class Handler(SimpleHandler):
    """wsgiref's response side, as an HTTP/1.1 origin server that closes the
    connection after each response."""

    os_environ = {}  # not the process's environment in every request
    http_version = "1.1"
    origin_server = True
    server_software = SERVER_SOFTWARE

    def cleanup_headers(self):
        super().cleanup_headers()
        self.headers["Connection"] = "close"

    def write(self, data):
        if self.environ.get("REQUEST_METHOD") != "HEAD":
            return super().write(data)
        if not self.status:
            raise AssertionError("write() before start_response()")
        if not self.headers_sent:
            self.bytes_sent = len(data)
            self.send_headers()
            self._flush()

    def log_exception(self, exc_info):
        # The traceback into the master's log, tagged with this worker.
        super().log_exception(exc_info)
        self.stderr.flush()


def _simple_response(wfile, status, body=b""):
    body = body or (status + "\n").encode()
    wfile.write(
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode("latin-1") + body
    )
    wfile.flush()


def handle_connection(app, conn, peer, listener, beat):
    """One request on `conn`, answered and closed. True if a response was sent."""
    wfile = conn.makefile("wb")
    try:
        try:
            got = read_head(conn, beat)
            if got is None:
                return False
            head, rest = got
            environ = build_environ(head, conn, peer, listener)
            conn.settimeout(IO_TIMEOUT)
            te = environ.pop("HTTP_TRANSFER_ENCODING", "").strip().lower()
            if environ.get("HTTP_EXPECT", "").lower() == "100-continue" and (
                te or environ.get("CONTENT_LENGTH", "0") not in ("", "0")
            ):
                if environ["SERVER_PROTOCOL"] == "HTTP/1.1":
                    wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    wfile.flush()
            if te:
                if "CONTENT_LENGTH" in environ:
                    raise BadRequest("400 Bad Request", "Content-Length with Transfer-Encoding")
                if te != "chunked":
                    raise BadRequest("501 Not Implemented", "transfer coding")
                reader = io.BufferedReader(_Reader(conn, rest, None))
                stdin, length = _dechunk(reader)
                environ["CONTENT_LENGTH"] = str(length)
            else:
                try:
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                except ValueError:
                    raise BadRequest("400 Bad Request", "bad Content-Length")
                if length < 0:
                    raise BadRequest("400 Bad Request", "bad Content-Length")
                stdin = io.BufferedReader(_Reader(conn, rest, length))
        except BadRequest as e:
            _simple_response(wfile, e.status)
            return True
        except socket.timeout:
            _simple_response(wfile, "408 Request Timeout")
            return True
        handler = Handler(
            stdin, wfile, sys.stderr, environ, multithread=False, multiprocess=True
        )
        handler.run(app)
        return True
    except OSError:
        return False  # the client went away
    finally:
        try:
            wfile.close()
        except OSError:
            pass
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()


def serve(app, listeners):
    """Serve `app` on `listeners` (socket objects) until TERM; returns the exit
    status. Call install_signals() first."""
    heartbeat = Heartbeat(period=POLL)
    board = Scoreboard()
    signal.signal(signal.SIGALRM, _ignore)  # the accept timer: EINTR, nothing more
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    served = 0
    reported, reported_at = 0, time.monotonic()

    def serve_one(conn, listener):
        nonlocal served
        try:
            peer = conn.getpeername()
        except OSError:
            peer = None
        board.begin()
        try:
            if handle_connection(app, conn, peer, listener, heartbeat.beat):
                served += 1
        finally:
            board.end()
        heartbeat.beat()

    notify(f"READY=1\nSTATUS=serving, pid {os.getpid()}")
    heartbeat.beat(force=True)
    try:
        while not Stop.requested:
            heartbeat.beat()
            ready, _, _ = select.select(listeners + [wake_r], [], [], POLL)
            if wake_r in ready:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            for listener in ready:
                if listener is wake_r or Stop.requested:
                    continue
                conn = accept_bounded(listener.fileno())
                if conn is None:
                    continue
                serve_one(conn, listener)
            now = time.monotonic()
            if served != reported and now - reported_at >= STATUS_EVERY:
                notify(f"STATUS=served {served} requests")
                reported, reported_at = served, now
        notify("STOPPING=1\nSTATUS=stopping: serving what the accept queues hold")
        drain(listeners, serve_one)
        # At once, not at the interpreter's exit: what arrives from now on is
        # reset at the last close, and the sooner the last close, the fewer.
        for listener in listeners:
            listener.close()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    notify(f"STATUS=stopping, served {served} requests")
    return 0


def drain(listeners, serve_one):
    """On TERM: serve what already waits in each listener's accept queue, until
    it is empty or as many as it held have been taken (a flood must not keep a
    stopping worker)."""
    for listener in listeners:
        budget = queued(listener)
        budget = DRAIN_UNKNOWN if budget is None else budget
        while budget > 0:
            ready, _, _ = select.select([listener], [], [], 0)
            if not ready:
                break
            budget -= 1
            conn = accept_bounded(listener.fileno())
            if conn is not None:
                serve_one(conn, listener)

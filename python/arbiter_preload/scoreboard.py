"""Say busy or idle on arbiterd's scoreboard, from any Python worker (one file,
standard library only: it can be copied next to an application that does not
install the package; examples/scoreboard uses it).

arbiterd hands each worker ARBITER_SCOREBOARD_FD (shared memory) and
ARBITER_SCOREBOARD_SLOT (its entry); the layout is in docs/workers.md. Marking
is a few aligned native-endian stores into the mapping: no syscall, no message.
Without an entry (not under arbiterd, or none was free) every call is a no-op.
One entry belongs to one process: a server that forks its own workers must not
share it between them.
"""

import ctypes, mmap, os, struct, threading, time

IDLE, BUSY = 1, 2


class Scoreboard:
    def __init__(self, environ=os.environ):
        self._state, self._inflight, self._lock = None, 0, threading.Lock()
        try:
            fd = int(environ["ARBITER_SCOREBOARD_FD"])
            index = int(environ["ARBITER_SCOREBOARD_SLOT"])
            worker_id = int(environ["ARBITER_WORKER_ID"])
        except (KeyError, ValueError):
            return
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)  # MAP_SHARED, read-write
        magic, version, entry_size, entries = struct.unpack_from("=4sIII", self._map, 0)
        entry = 64 + 64 * index
        if (magic, version, entry_size) != (b"ARSB", 1, 64) or index >= entries:
            return
        if ctypes.c_uint64.from_buffer(self._map, entry).value != worker_id:
            return  # not ours: never write to another worker's entry
        self._state = ctypes.c_uint32.from_buffer(self._map, entry + 8)
        self._requests = ctypes.c_uint64.from_buffer(self._map, entry + 16)
        self._changed = ctypes.c_uint64.from_buffer(self._map, entry + 24)
        self._set(IDLE)

    def _set(self, state):
        # The time of the change first, then the state, as the layout says.
        if self._state is not None and self._state.value != state:
            self._changed.value = time.monotonic_ns()
            self._state.value = state

    def begin(self):
        """A request is in hand: busy."""
        with self._lock:
            self._inflight += 1
            self._set(BUSY)

    def end(self):
        """A request is done: counted, and idle if it was the last one."""
        with self._lock:
            self._inflight -= 1
            if self._state is not None:
                self._requests.value += 1
            if self._inflight == 0:
                self._set(IDLE)


class _Body:
    """The app's response iterable, ending the request once the server closes it
    (after the last byte is written)."""

    def __init__(self, body, done):
        self._body, self._done = body, done

    def __iter__(self):
        return iter(self._body)

    def close(self):
        try:
            if hasattr(self._body, "close"):
                self._body.close()
        finally:
            done, self._done = self._done, None
            if done:
                done()


class WSGIMiddleware:
    """Busy from the call until the response is sent."""

    def __init__(self, app, board=None):
        self.app, self.board = app, board or Scoreboard()

    def __call__(self, environ, start_response):
        self.board.begin()
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.board.end()
            raise
        return _Body(body, self.board.end)


class ASGIMiddleware:
    """Busy while an HTTP request or a websocket is being handled."""

    def __init__(self, app, board=None):
        self.app, self.board = app, board or Scoreboard()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.board.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.board.end()

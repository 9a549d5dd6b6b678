"""The template and its workers, with this test playing arbiterd's part.

    python3 -m unittest discover -s python/tests

The test process makes itself a child subreaper, as the master is, so the
workers (its grandchildren-once-removed, orphaned by the double fork) come to it
and it can read their exit statuses.
"""

import array
import ctypes
import fcntl
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

PYDIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PR_SET_CHILD_SUBREAPER = 36
TIMEOUT = 10.0


def make_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def high(fd):
    """A close-on-exec copy of `fd` above the numbers the child gets."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is the state (field 3): ppid is field 4, pgrp 5, session 6.
    return {"ppid": int(rest[1]), "pgrp": int(rest[2]), "session": int(rest[3])}


def http_get(port, path="/", timeout=TIMEOUT, method="GET", body=b""):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


class Harness:
    """A listener, a template socket pair, a notify socket, and every process
    started, killed and reaped at the end whatever happened."""

    def __init__(self, test):
        self.test = test
        self.tmp = tempfile.TemporaryDirectory()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.notify_path = os.path.join(self.tmp.name, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.pids = []  # everything to kill and reap at the end
        self.closables = [self.listener, self.notify]
        self.master = None
        self.template_pid = None
        self.template_log = None

    # -- processes -----------------------------------------------------------

    def spawn(self, args, template=True, extra_env=None, fds=None):
        """python3 -m arbiter_preload ARGS, cwd python/, the listener at fd 3 and
        the template socket at fd 4 (where arbiterd puts them for one --bind)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ARBITER_", "LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))
        }
        env.update(
            LISTEN_FDS="1",
            LISTEN_FDNAMES="127.0.0.1:%d" % self.port,
            ARBITER_GENERATION="1",
            ARBITER_MASTER_PID=str(os.getpid()),
            ARBITER_TIMEOUT="30",
            NOTIFY_SOCKET=self.notify_path,
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.update(extra_env or {})
        log = tempfile.TemporaryFile(dir=self.tmp.name)
        self.closables.append(log)
        copies = [high(self.listener.fileno()), high(log.fileno())]
        actions = [
            (os.POSIX_SPAWN_DUP2, copies[1], 1),
            (os.POSIX_SPAWN_DUP2, copies[1], 2),
            (os.POSIX_SPAWN_DUP2, copies[0], 3),
        ]
        if template:
            self.master, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.closables.append(self.master)
            copies.append(high(theirs.fileno()))
            theirs.close()
            actions.append((os.POSIX_SPAWN_DUP2, copies[-1], 4))
            env["ARBITER_TEMPLATE_FD"] = "4"
        for target, fd in (fds or {}).items():
            copies.append(high(fd))
            actions.append((os.POSIX_SPAWN_DUP2, copies[-1], target))
        # sh: LISTEN_PID is the pid the program will have (exec keeps it).
        argv = [
            "/bin/sh",
            "-c",
            'export LISTEN_PID=$$; cd "$0" && exec "$@"',
            PYDIR,
            sys.executable,
            "-m",
            "arbiter_preload",
        ] + list(args)
        try:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        finally:
            for fd in copies:
                os.close(fd)
        self.pids.append(pid)
        if template:
            self.template_pid, self.template_log = pid, log
        return pid, log

    def wait_exit(self, pid, timeout=TIMEOUT):
        """The exit code of `pid` (negative: the signal), reaped."""
        deadline = time.monotonic() + timeout
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                if pid in self.pids:
                    self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                self.test.fail(f"pid {pid} did not exit within {timeout}s")
            time.sleep(0.02)

    def close(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.pids = []
        for c in self.closables:
            try:
                c.close()
            except OSError:
                pass
        self.tmp.cleanup()

    # -- the protocol ---------------------------------------------------------

    def recv_line(self, timeout=TIMEOUT):
        self.master.settimeout(timeout)
        try:
            data = self.master.recv(4096)
        except socket.timeout:
            self.test.fail(f"nothing from the template within {timeout}s; its log:\n{self.log(self.template_log)}")
        return data.decode()

    def wait_ready(self):
        line = self.recv_line(timeout=30)
        self.test.assertEqual(line, "READY 1")

    def fork(self, worker_id, scoreboard=None, cgroup=None, env=None, fds_names=None):
        """FORK worker_id; returns (reply, the read end of its stdio, heartbeat file)."""
        out_r, out_w = os.pipe()
        heartbeat = tempfile.TemporaryFile(dir=self.tmp.name)
        self.closables.append(heartbeat)
        self.closables.append(os.fdopen(out_r, "rb", buffering=0))
        lines = [
            f"FORK {worker_id}",
            f"ARBITER_WORKER_ID={worker_id}",
            f"ARBITER_SLOT={worker_id % 4}",
            "ARBITER_HEARTBEAT_FD=4",
        ]
        fds, names = [out_w, heartbeat.fileno()], ["stdio", "heartbeat"]
        if scoreboard is not None:
            lines += ["ARBITER_SCOREBOARD_FD=5", "ARBITER_SCOREBOARD_SLOT=0"]
            fds.append(scoreboard)
            names.append("scoreboard")
        if cgroup is not None:
            fds.append(cgroup)
            names.append("cgroup")
        lines += [f"{k}={v}" for k, v in (env or {}).items()]
        lines.append("FDS=" + ",".join(fds_names if fds_names is not None else names))
        self.master.sendmsg(
            ["\n".join(lines).encode()],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
        )
        os.close(out_w)  # the template holds its copy now
        reply = self.recv_line()
        if reply.startswith("FORKED "):
            self.pids.append(int(reply.split()[2]))
        return reply, out_r, heartbeat

    def notifications(self, timeout=TIMEOUT, until=None):
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                got.append(self.notify.recv(4096).decode())
            except socket.timeout:
                break
            if until and until(got):
                break
        return got

    @staticmethod
    def log(f):
        if f is None:
            return ""
        f.seek(0)
        return f.read().decode(errors="replace")


def read_available(fd):
    os.set_blocking(fd, False)
    data = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data.decode(errors="replace")


def new_scoreboard(worker_id, entries=2):
    fd = os.memfd_create("scoreboard", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 + 64 * entries)
    os.pwrite(fd, struct.pack("=4sIII", b"ARSB", 1, 64, entries), 0)
    os.pwrite(fd, struct.pack("=Q", worker_id), 64)
    return fd


def scoreboard_entry(fd):
    raw = os.pread(fd, 64, 64)
    worker_id, state, _, requests, changed = struct.unpack_from("=QIIQQ", raw)
    return {"worker_id": worker_id, "state": state, "requests": requests}


class TemplateTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        make_subreaper()

    def setUp(self):
        self.h = Harness(self)
        self.addCleanup(self.h.close)

    def start_template(self, *extra):
        pid, log = self.h.spawn(["tests.fixture_app:app", "--post-fork", "tests.fixture_app:post_fork"] + list(extra))
        self.h.wait_ready()
        return pid, log

    def test_fork_serve_and_term(self):
        h = self.h
        tpid, tlog = self.start_template()
        board = new_scoreboard(7)
        self.addCleanup(os.close, board)
        cg_r, cg_w = os.pipe()
        self.addCleanup(os.close, cg_r)
        reply, out_r, heartbeat = h.fork(7, scoreboard=board, cgroup=cg_w, env={"WATCHDOG_USEC": "30000000"})
        os.close(cg_w)
        self.assertRegex(reply, r"^FORKED 7 \d+$", h.log(tlog))
        pid = int(reply.split()[2])
        self.assertNotEqual(pid, tpid)

        # Ready over NOTIFY_SOCKET once serving.
        notes = h.notifications(until=lambda got: any("READY=1" in n for n in got))
        self.assertTrue(any("READY=1" in n for n in notes), notes)

        # It serves, preloaded: the app was imported in the template.
        status, head, body = http_get(h.port)
        self.assertEqual(status, 200, head)
        self.assertIn("Connection: close", head)
        info = json.loads(body)
        self.assertEqual(info["pid"], pid)
        self.assertEqual(info["loaded_in"], tpid)
        self.assertEqual(info["worker_id"], "7")
        self.assertEqual(info["listen_pid"], str(pid))
        self.assertIsNone(info["template_fd"])
        self.assertEqual(info["post_fork_calls"], [pid])
        self.assertEqual(info["pdeathsig"], signal.SIGKILL)  # as an exec'd worker

        # The environment as the programs it starts get it. (/proc/PID/environ
        # cannot show it: it is the block the template was exec'd with.)
        status, _, body = http_get(h.port, "/child-env")
        self.assertEqual(status, 200)
        child_env = dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)
        self.assertEqual(child_env.get("LISTEN_PID"), str(pid))
        self.assertEqual(child_env.get("ARBITER_WORKER_ID"), "7")
        self.assertEqual(child_env.get("ARBITER_HEARTBEAT_FD"), "4")
        self.assertEqual(child_env.get("WATCHDOG_PID"), str(pid))
        self.assertNotIn("ARBITER_TEMPLATE_FD", child_env)

        # Its own session and group; re-parented to us (the subreaper).
        st = stat_fields(pid)
        self.assertEqual(st["session"], pid)
        self.assertEqual(st["pgrp"], pid)
        self.assertEqual(st["ppid"], os.getpid())

        # Joined its cgroup: wrote 0 on the fd.
        self.assertEqual(os.read(cg_r, 16), b"0")

        # Its fds: the heartbeat at 4, the scoreboard at 5, nothing of the template's.
        self.assertEqual(os.stat(f"/proc/{pid}/fd/4").st_ino, os.fstat(heartbeat.fileno()).st_ino)
        self.assertEqual(os.stat(f"/proc/{pid}/fd/5").st_ino, os.fstat(board).st_ino)
        template_sock = os.readlink(f"/proc/{tpid}/fd/4")
        worker_fds = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        self.assertNotIn(template_sock, worker_fds)

        # The heartbeat's ctime advances while idle.
        before = os.fstat(heartbeat.fileno()).st_ctime_ns
        time.sleep(1.2)
        self.assertGreater(os.fstat(heartbeat.fileno()).st_ctime_ns, before)

        # The scoreboard: counted, idle between requests.
        entry = scoreboard_entry(board)
        self.assertEqual(entry["worker_id"], 7)
        self.assertEqual(entry["state"], 1)
        self.assertEqual(entry["requests"], 2)

        # A failing app: 500, and the traceback on its stderr (the stdio fd).
        status, _, _ = http_get(h.port, "/boom")
        self.assertEqual(status, 500)
        time.sleep(0.2)
        self.assertIn("RuntimeError: boom", read_available(out_r))

        # A body comes through.
        status, _, body = http_get(h.port, "/echo", method="POST", body=b"x" * 100000)
        self.assertEqual((status, len(body)), (200, 100000))

        # TERM with a request in hand: it is answered, then the worker exits 0.
        result = {}

        def slow():
            result["r"] = http_get(h.port, "/sleep?ms=800")

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        t.join(TIMEOUT)
        self.assertEqual(result["r"][0], 200)
        self.assertEqual(json.loads(result["r"][2])["pid"], pid)
        self.assertEqual(h.wait_exit(pid), 0)

        # TERM to the template: exit 0 at once.
        os.kill(tpid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(tpid), 0)

    def test_workers_share_the_listener(self):
        h = self.h
        tpid, tlog = self.start_template()
        pids = set()
        for wid in (1, 2, 3):
            reply, _, _ = h.fork(wid)
            self.assertTrue(reply.startswith(f"FORKED {wid} "), reply)
            pids.add(int(reply.split()[2]))
        h.notifications(until=lambda got: sum("READY=1" in n for n in got) >= 3)
        seen, errors = [], []

        def client():
            try:
                for _ in range(15):
                    status, _, body = http_get(h.port)
                    self.assertEqual(status, 200)
                    seen.append(json.loads(body)["pid"])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(seen), 60)
        self.assertTrue(set(seen) <= pids)
        # The template dies; its workers serve on.
        os.kill(tpid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(tpid), 0)
        self.assertEqual(http_get(h.port)[0], 200)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            self.assertEqual(h.wait_exit(pid), 0)

    def test_quit_exits_at_once(self):
        h = self.h
        self.start_template()
        reply, _, _ = h.fork(1)
        pid = int(reply.split()[2])
        h.notifications(until=lambda got: any("READY=1" in n for n in got))
        os.kill(pid, signal.SIGQUIT)
        self.assertEqual(h.wait_exit(pid), 0)

    def test_bad_fork_fails_and_the_template_carries_on(self):
        h = self.h
        tpid, _ = self.start_template()
        reply, _, _ = h.fork(9, fds_names=["stdio"])  # two fds come, one is named
        self.assertTrue(reply.startswith("FAILED 9 "), reply)
        reply, _, _ = h.fork(10)
        self.assertTrue(reply.startswith("FORKED 10 "), reply)
        pid = int(reply.split()[2])
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(pid), 0)

    def test_template_exits_0_when_the_master_is_gone(self):
        h = self.h
        tpid, _ = self.start_template()
        h.master.close()
        self.assertEqual(h.wait_exit(tpid), 0)

    def test_app_load_error_exits_4(self):
        h = self.h
        pid, log = h.spawn(["tests.fixture_broken:app"])
        self.assertEqual(h.wait_exit(pid), 4)
        text = h.log(log)
        self.assertIn("Traceback", text)
        self.assertIn("this application does not load", text)

    def test_plain_worker(self):
        """Without ARBITER_TEMPLATE_FD: the same command line serves directly."""
        h = self.h
        heartbeat = tempfile.TemporaryFile(dir=h.tmp.name)
        h.closables.append(heartbeat)
        pid, log = h.spawn(
            ["tests.fixture_app:app", "--post-fork", "tests.fixture_app:post_fork"],
            template=False,
            extra_env={"ARBITER_WORKER_ID": "3", "ARBITER_HEARTBEAT_FD": "4"},
            fds={4: heartbeat.fileno()},
        )
        notes = h.notifications(until=lambda got: any("READY=1" in n for n in got))
        self.assertTrue(any("READY=1" in n for n in notes), h.log(log))
        status, _, body = http_get(h.port)
        self.assertEqual(status, 200)
        info = json.loads(body)
        self.assertEqual((info["pid"], info["loaded_in"], info["listen_pid"]), (pid, pid, str(pid)))
        self.assertEqual(info["post_fork_calls"], [pid])
        before = os.fstat(heartbeat.fileno()).st_ctime_ns
        time.sleep(1.2)
        self.assertGreater(os.fstat(heartbeat.fileno()).st_ctime_ns, before)
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(pid), 0, h.log(log))

    @unittest.skipUnless(importlib.util.find_spec("uvicorn"), "uvicorn is not installed")
    def test_asgi(self):
        h = self.h
        tpid, tlog = h.spawn(["tests.fixture_asgi:app", "--asgi"])
        h.wait_ready()
        reply, out_r, heartbeat = h.fork(4)
        self.assertTrue(reply.startswith("FORKED 4 "), reply + h.log(tlog))
        pid = int(reply.split()[2])
        notes = h.notifications(until=lambda got: any("READY=1" in n for n in got))
        self.assertTrue(any("READY=1" in n for n in notes), read_available(out_r))
        status, _, body = http_get(h.port)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"pid": pid, "worker_id": "4"})
        before = os.fstat(heartbeat.fileno()).st_ctime_ns
        time.sleep(1.2)
        self.assertGreater(os.fstat(heartbeat.fileno()).st_ctime_ns, before)
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(pid), 0, read_available(out_r))
        os.kill(tpid, signal.SIGTERM)
        self.assertEqual(h.wait_exit(tpid), 0)


if __name__ == "__main__":
    unittest.main()


class BoundedAcceptTest(unittest.TestCase):
    """A worker that polls the shared (blocking) listener and loses the race for
    the connection must not stay in accept(): the 10 ms timer brings it back."""

    def test_lost_race_returns(self):
        sys.path.insert(0, PYDIR)
        try:
            from arbiter_preload import wsgi
        finally:
            sys.path.remove(PYDIR)
        old = signal.signal(signal.SIGALRM, wsgi._ignore)
        self.addCleanup(signal.signal, signal.SIGALRM, old)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.assertTrue(listener.getblocking())
            start = time.monotonic()
            self.assertIsNone(wsgi.accept_bounded(listener.fileno()))
            self.assertLess(time.monotonic() - start, 1.0)
            with socket.create_connection(listener.getsockname()):
                conn = wsgi.accept_bounded(listener.fileno())
                self.assertIsNotNone(conn)
                conn.close()
            self.assertTrue(listener.getblocking())  # left as it was

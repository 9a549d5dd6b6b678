"""A minimal --preload template (protocol v1, docs/workers.md "Preloading").

argv[1]: a file whose content is the answer every worker gives (read once, at
load: what the template "preloaded"). While ARGV[1].fail exists the template
exits 4 without loading. Each worker answers `GET /` with JSON
{"pid", "answer", "template", "worker_id", "generation"} and says READY=1.
"""

import array
import json
import os
import signal
import socket
import struct
import sys

answer_file = sys.argv[1]
# A broken release: the application does not load (exit 4, as gunicorn's).
if os.path.exists(answer_file + ".fail"):
    print("cannot load the application", file=sys.stderr)
    sys.exit(4)
with open(answer_file) as f:
    ANSWER = f.read().strip()
TEMPLATE = os.getpid()
sock = socket.socket(fileno=int(os.environ["ARBITER_TEMPLATE_FD"]))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
sock.send(b"READY 1")


def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(msg, "\0" + addr[1:] if addr.startswith("@") else addr)
        s.close()


def serve():
    hb = int(os.environ["ARBITER_HEARTBEAT_FD"])
    listener = socket.socket(fileno=3)
    # accept() gives up after 0.2 s (SO_RCVTIMEO; every worker of this program
    # shares the socket and wants the same), so TERM only has to set a flag: a
    # connection once accepted is always answered, and an idle worker notices the
    # flag within 0.2 s.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    notify(b"READY=1")
    while not stopping:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        with conn:
            # The whole request head: closing with some of it unread would reset
            # the connection under the answer.
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = json.dumps({
                "pid": os.getpid(),
                "answer": ANSWER,
                "template": TEMPLATE,
                "worker_id": int(os.environ["ARBITER_WORKER_ID"]),
                "listen_pid": os.environ["LISTEN_PID"],
                "generation": int(os.environ["ARBITER_GENERATION"]),
            }).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        os.fchmod(hb, 0o600 if os.fstat(hb).st_mode & 0o777 != 0o600 else 0o400)
    os._exit(0)


while True:
    fds = array.array("i")
    msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * fds.itemsize))
    if not msg:
        os._exit(0)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    lines = msg.decode().split("\n")
    wid = lines[0].split()[1]
    env = dict(l.split("=", 1) for l in lines[1:] if "=" in l)
    names = env.pop("FDS").split(",")
    got = dict(zip(names, fds))
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        worker = os.fork()
        if worker == 0:
            os.setsid()
            if "cgroup" in got:
                os.write(got["cgroup"], b"0")
            os.dup2(got["stdio"], 1)
            os.dup2(got["stdio"], 2)
            os.dup2(got["heartbeat"], int(env["ARBITER_HEARTBEAT_FD"]))
            if "scoreboard" in got:
                os.dup2(got["scoreboard"], int(env["ARBITER_SCOREBOARD_FD"]))
            keep = {0, 1, 2, 3, int(env["ARBITER_HEARTBEAT_FD"]), int(env.get("ARBITER_SCOREBOARD_FD", 0))}
            for fd in list(got.values()) + [sock.fileno(), r, w]:
                if fd not in keep:
                    os.close(fd)
            os.environ.update(env)
            os.environ["LISTEN_PID"] = str(os.getpid())
            serve()
        os.write(w, str(worker).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(w)
    pid = os.read(r, 32).decode()
    os.close(r)
    for fd in fds:
        os.close(fd)
    sock.send(f"FORKED {wid} {pid}".encode())

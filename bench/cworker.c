/*
 * cworker: a minimal COMMAND worker for arbiterd, used by bench/run.py only when the
 * built-in worker does not serve (`--worker c`, or `auto` with a built-in that fails).
 * It follows docs/workers.md: listener at fd 3, READY=1 on NOTIFY_SOCKET, heartbeat
 * on ARBITER_HEARTBEAT_FD every ARBITER_TIMEOUT/4, and answers every request with
 * {"pid":..,"worker_id":..,"slot":..,"generation":..} and Connection: close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void notify(const char *msg) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof a.sun_path)
        return;
    memcpy(a.sun_path, path, len);
    if (a.sun_path[0] == '@')
        a.sun_path[0] = 0;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return;
    sendto(s, msg, strlen(msg), 0, (struct sockaddr *)&a,
           (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    close(s);
}

int main(void) {
    const char *e;
    int hb = (e = getenv("ARBITER_HEARTBEAT_FD")) ? atoi(e) : -1;
    double timeout = (e = getenv("ARBITER_TIMEOUT")) ? atof(e) : 0;
    int beat_ms = timeout > 0 ? (int)(timeout * 1000 / 4) : -1;
    char body[256], resp[512];
    const char *id = getenv("ARBITER_WORKER_ID"), *slot = getenv("ARBITER_SLOT"),
               *gen = getenv("ARBITER_GENERATION");
    int blen = snprintf(body, sizeof body,
                        "{\"pid\":%d,\"worker_id\":%s,\"slot\":%s,\"generation\":%s}",
                        getpid(), id ? id : "0", slot ? slot : "0", gen ? gen : "0");
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                        blen, body);
    struct sigaction sa = {.sa_handler = on_term, .sa_flags = SA_RESTART};
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    notify("READY=1");
    int flip = 0;
    while (!stop) {
        if (hb >= 0)
            fchmod(hb, (flip ^= 1) ? 0400 : 0600);
        struct pollfd p = {.fd = 3, .events = POLLIN};
        int r = poll(&p, 1, beat_ms);
        if (r <= 0)
            continue;
        int c = accept4(3, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0)
            continue;
        int fl = fcntl(c, F_GETFL);
        fcntl(c, F_SETFL, fl & ~O_NONBLOCK);
        char buf[8192];
        size_t got = 0;
        while (got < sizeof buf - 1) {
            ssize_t n = recv(c, buf + got, sizeof buf - 1 - got, 0);
            if (n <= 0)
                break;
            got += (size_t)n;
            buf[got] = 0;
            if (strstr(buf, "\r\n\r\n"))
                break;
        }
        if (got > 0)
            send(c, resp, (size_t)rlen, MSG_NOSIGNAL);
        close(c);
    }
    return 0;
}

/*
 * floor: the physical limit of spawning a worker on this machine, for bench/run.py.
 *
 *   floor seq M    M times, one after another: fork, execve(this program, "--ready"),
 *                  wait until the child has written one byte on fd 3 (it is "serving"),
 *                  then waitpid it. Prints the median and the 90th percentile of the
 *                  fork -> byte time, in microseconds.
 *   floor boot N   fork+exec N children that stay alive (as workers do), each writes
 *                  one byte on fd 3 once exec'd; time from the first fork until all N
 *                  bytes arrived. Then SIGKILL and reap them all.
 *
 * Output: one JSON object on stdout. The children are this same binary, dynamically
 * linked against libc, as small as a worker gets.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char self[4096];

static pid_t spawn(int wfd, const char *mode) {
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    if (pid == 0) {
        if (dup2(wfd, 3) < 0)
            _exit(127);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        char *argv[] = {self, (char *)mode, NULL};
        execv(self, argv);
        _exit(127);
    }
    return pid;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--ready") == 0) {
        return write(3, "x", 1) == 1 ? 0 : 1;
    }
    if (argc >= 2 && strcmp(argv[1], "--stay") == 0) {
        if (write(3, "x", 1) != 1)
            return 1;
        close(3);
        pause();
        return 0;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: floor seq M | floor boot N\n");
        return 2;
    }
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0) {
        perror("readlink");
        return 1;
    }
    self[n] = 0;
    long count = atol(argv[2]);
    int p[2];
    if (pipe(p) < 0) {
        perror("pipe");
        return 1;
    }
    char buf[4096];
    if (strcmp(argv[1], "seq") == 0) {
        double *t = calloc(count, sizeof *t);
        for (long i = 0; i < count; i++) {
            double t0 = now();
            pid_t pid = spawn(p[1], "--ready");
            if (read(p[0], buf, 1) != 1) {
                perror("read");
                return 1;
            }
            t[i] = now() - t0;
            waitpid(pid, NULL, 0);
        }
        qsort(t, count, sizeof *t, cmp);
        printf("{\"mode\":\"seq\",\"n\":%ld,\"median_us\":%.1f,\"p90_us\":%.1f}\n", count,
               t[count / 2] * 1e6, t[(count * 9) / 10] * 1e6);
        return 0;
    }
    if (strcmp(argv[1], "boot") == 0) {
        pid_t *pids = calloc(count, sizeof *pids);
        double t0 = now();
        for (long i = 0; i < count; i++)
            pids[i] = spawn(p[1], "--stay");
        long got = 0;
        while (got < count) {
            ssize_t r = read(p[0], buf, sizeof buf);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                perror("read");
                return 1;
            }
            got += r;
        }
        double t = now() - t0;
        for (long i = 0; i < count; i++)
            kill(pids[i], SIGKILL);
        for (long i = 0; i < count; i++)
            waitpid(pids[i], NULL, 0);
        printf("{\"mode\":\"boot\",\"n\":%ld,\"secs\":%.6f}\n", count, t);
        return 0;
    }
    fprintf(stderr, "floor: unknown mode %s\n", argv[1]);
    return 2;
}

// The example server's upgrade measured from outside, as issue 12 asks, by
// a program that is neither Rust nor the bench. For each binary given it
// starts a server (`BIN --listen 127.0.0.1:0 --pid-file DIR/K/pid`, its
// output to /dev/null); the rounds alternate the binaries, and each round
// takes the floor (`posix_spawn` of `BIN --help`, then `waitpid`), then
// `kill(OLD, SIGHUP)` -> the PID file names another pid (inotify on its
// directory) -> the old process reaped (this program is a child subreaper,
// so every generation is its child by the time it exits). Prints medians
// and their ratios to the floor. Linux. BENCHMARKING.md, ninth session.
//
//   cc -O2 -o /tmp/outside benches/tools/outside.c
//   /tmp/outside target/outside 60 50000 target/release/examples/http_server [OTHER_BIN...]
//   taskset -c 0 /tmp/outside ...      # every process on one vCPU
//
// Usage: outside DIR ROUNDS GAP_US BIN...
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

// The pid a PID file names, or -1.
static int read_pid(const char *path) {
    char text[32] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    return n > 0 ? atoi(text) : -1;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *values, int n) {
    double *sorted = malloc(n * sizeof *sorted);
    memcpy(sorted, values, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, by_value);
    double m = sorted[n / 2];
    free(sorted);
    return m;
}

static void drain(int inotify) {
    char events[4096];
    while (read(inotify, events, sizeof events) > 0) {}
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s DIR ROUNDS GAP_US BIN...\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    int rounds = atoi(argv[2]), gap_us = atoi(argv[3]), count = argc - 4;
    char **bins = argv + 4;
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    mkdir(dir, 0755);

    posix_spawn_file_actions_t quiet;
    posix_spawn_file_actions_init(&quiet);
    posix_spawn_file_actions_addopen(&quiet, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&quiet, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&quiet, 2, "/dev/null", O_WRONLY, 0);

    char (*pid_file)[4096] = calloc(count, sizeof *pid_file);
    int *inotify = calloc(count, sizeof *inotify);
    for (int k = 0; k < count; k++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%d", dir, k);
        mkdir(sub, 0755);
        snprintf(pid_file[k], sizeof pid_file[k], "%.4000s/pid", sub);
        unlink(pid_file[k]);
        inotify[k] = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
        inotify_add_watch(inotify[k], sub, IN_MOVED_TO | IN_CLOSE_WRITE);
        char *args[] = {bins[k], "--listen", "127.0.0.1:0", "--pid-file", pid_file[k], NULL};
        pid_t server;
        if (posix_spawn(&server, bins[k], &quiet, NULL, args, environ) != 0) {
            perror(bins[k]);
            return 1;
        }
        // Ready once its PID file names it (inotify says when it changes).
        while (read_pid(pid_file[k]) != server) {
            struct pollfd changed = {inotify[k], POLLIN, 0};
            poll(&changed, 1, 5000);
            drain(inotify[k]);
        }
    }
    usleep(300000); // a quiet moment before the first round, as between rounds

    double *floor = calloc(count * rounds, sizeof *floor);
    double *named = calloc(count * rounds, sizeof *named);
    double *gone = calloc(count * rounds, sizeof *gone);
    for (int round = 0; round < rounds; round++) {
        for (int turn = 0; turn < count; turn++) {
            int k = (round + turn) % count, at = k * rounds + round, status;
            char *help[] = {bins[k], "--help", NULL};
            pid_t bare;
            double started = now_ms();
            posix_spawn(&bare, bins[k], &quiet, NULL, help, environ);
            waitpid(bare, &status, 0);
            floor[at] = now_ms() - started;
            usleep(gap_us);

            int old = read_pid(pid_file[k]);
            drain(inotify[k]);
            started = now_ms();
            kill(old, SIGHUP);
            for (;;) {
                int pid = read_pid(pid_file[k]);
                if (pid > 0 && pid != old) break;
                struct pollfd ready = {inotify[k], POLLIN, 0};
                poll(&ready, 1, 5000);
                drain(inotify[k]);
            }
            named[at] = now_ms() - started;
            waitpid(old, &status, 0);
            gone[at] = now_ms() - started;
            usleep(gap_us > 20000 ? gap_us : 20000);
        }
    }
    for (int k = 0; k < count; k++) {
        double f = median(floor + k * rounds, rounds);
        double p = median(named + k * rounds, rounds);
        double g = median(gone + k * rounds, rounds);
        printf("%-50s floor %.3f ms  PID file %.3f ms (%.3fx)  old gone %.3f ms (%.3fx)\n",
               bins[k], f, p, p / f, g, g / f);
        pid_t serving = read_pid(pid_file[k]);
        kill(serving, SIGTERM);
        int status;
        waitpid(serving, &status, 0);
    }
    return 0;
}

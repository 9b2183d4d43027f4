// What a wake-up costs on this machine: a thread blocked in read(2) on a
// pipe is woken by a write from vCPU 0, the sleeper being on vCPU SLEEPER
// (the same or the other one), after the sleeper's vCPU has idled 0.1, 1,
// 10 and 50 ms. Prints the median and p90 latency from the write to the
// sleeper's return from read(2). Linux. BENCHMARKING.md, ninth session.
//
//   cc -O2 -pthread -o /tmp/vcpu-wake benches/tools/vcpu-wake.c
//   /tmp/vcpu-wake 100 1; /tmp/vcpu-wake 100 0     # ROUNDS SLEEPER
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int wake[2], woke[2];
static int sleeper_cpu;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Blocks in read(2); sends back when it returned.
static void *sleeper(void *unused) {
    (void)unused;
    pin(sleeper_cpu);
    char byte;
    while (read(wake[0], &byte, 1) == 1) {
        double returned = now_us();
        if (write(woke[1], &returned, sizeof returned) != sizeof returned) break;
    }
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s ROUNDS SLEEPER_CPU\n", argv[0]);
        return 2;
    }
    int rounds = atoi(argv[1]);
    sleeper_cpu = atoi(argv[2]);
    pin(0);
    if (pipe(wake) || pipe(woke)) return 1;
    pthread_t thread;
    pthread_create(&thread, NULL, sleeper, NULL);
    usleep(10000);
    const int idle_us[] = {100, 1000, 10000, 50000};
    double *latency = calloc(rounds, sizeof *latency);
    for (int i = 0; i < 4; i++) {
        for (int round = 0; round < rounds; round++) {
            usleep(idle_us[i]);
            double written = now_us(), returned;
            if (write(wake[1], "x", 1) != 1) return 1;
            if (read(woke[0], &returned, sizeof returned) != sizeof returned) return 1;
            latency[round] = returned - written;
        }
        qsort(latency, rounds, sizeof *latency, by_value);
        printf("waker on cpu 0, sleeper on cpu %d, idle %6d us: median %6.1f us, p90 %6.1f us\n",
               sleeper_cpu, idle_us[i], latency[rounds / 2], latency[rounds * 9 / 10]);
    }
    return 0;
}

/* Signals a process through glibc's kill(2) from a call chain built without frame pointers
 * (-O2 -fomit-frame-pointer): main -> send_all -> send_one -> kill. `sender-c PID SIGNAL COUNT`
 * prints how many it sent, then stays three seconds (as a service's process would: one that exits
 * within a millisecond of signalling can be gone before its mappings are read, and under
 * instruction emulation beside other tests that reading can take a second). Only unwind
 * tables (.eh_frame) walk its stack back to `main`. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long sent;

__attribute__((noipa)) int send_one(pid_t pid, int sig) {
    int r = kill(pid, sig);
    /* Work after the call, so it is not a tail call. */
    sent += r == 0;
    return r;
}

__attribute__((noipa)) void send_all(pid_t pid, int sig, long count) {
    for (long i = 0; i < count; i++)
        if (send_one(pid, sig) != 0) {
            perror("kill");
            exit(1);
        }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: sender-c PID SIGNAL COUNT\n");
        return 2;
    }
    send_all((pid_t)atoi(argv[1]), atoi(argv[2]), atol(argv[3]));
    printf("%ld\n", sent);
    fflush(stdout);
    sleep(3);
    return 0;
}

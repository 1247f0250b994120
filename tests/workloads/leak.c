/* Leaks through a call chain built without frame pointers (-O2 -fomit-frame-pointer):
 * main -> grow -> grow_more -> keep -> malloc, COUNT blocks of SIZE bytes, one every
 * millisecond; beside it, churn -> malloc/free of the same size, which leaves nothing in use.
 * `leak-c COUNT SIZE` prints the bytes it leaked. Only unwind tables (.eh_frame) walk its stack
 * from the allocator's caller back to `main`.
 * `leak-c COUNT SIZE exec` leaks the same way, then re-executes itself (same pid, a new address
 * space) and leaks COUNT blocks again through `retain`. Both images run without address
 * randomisation, so the second one's allocator hands out the very addresses of the first one's
 * leaked blocks, whose frees no probe saw. */
#include <stdio.h>
#include <sys/personality.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *kept[1 << 16];
long nkept;

__attribute__((noipa)) void keep(size_t size) {
    void *p = malloc(size);
    /* Touched, so the block is real (the build has no sibling calls either). */
    memset(p, 1, size);
    /* Kept where the compiler cannot prove it unread. */
    __asm__ volatile("" : : "r"(p) : "memory");
    kept[nkept++ & 0xffff] = p;
}

__attribute__((noipa)) void grow_more(size_t size) {
    keep(size);
}

__attribute__((noipa)) void grow(size_t size) {
    grow_more(size);
}

__attribute__((noipa)) void retain(size_t size) {
    void *p = malloc(size);
    memset(p, 3, size);
    __asm__ volatile("" : : "r"(p) : "memory");
    kept[nkept++ & 0xffff] = p;
}

__attribute__((noipa)) void churn(size_t size) {
    void *p = malloc(size);
    memset(p, 2, size);
    /* The compiler may not drop the pair as dead. */
    __asm__ volatile("" : : "r"(p) : "memory");
    free(p);
}

/* Replaces this image with itself, its last argument set to `phase`. */
static void reexec(char **argv, char *phase) {
    char *args[] = {argv[0], argv[1], argv[2], phase, NULL};
    execv("/proc/self/exe", args);
    perror("leak-c: execv");
    exit(1);
}

int main(int argc, char **argv) {
    const char *phase = argc == 4 ? argv[3] : "";
    if (argc != 3 && !(argc == 4 && (!strcmp(phase, "exec") || !strcmp(phase, "first") ||
                                     !strcmp(phase, "again")))) {
        fprintf(stderr, "usage: leak-c COUNT SIZE [exec]\n");
        return 2;
    }
    if (!strcmp(phase, "exec")) {
        /* Both leaking images get the same layout; "first" and "again" are of one length, so
         * not even the stack moves. */
        if (personality(ADDR_NO_RANDOMIZE) == -1) {
            perror("leak-c: personality");
            return 1;
        }
        reexec(argv, "first");
    }
    long count = atol(argv[1]);
    size_t size = (size_t)atol(argv[2]);
    for (long i = 0; i < count; i++) {
        if (!strcmp(phase, "again")) {
            retain(size);
        } else {
            grow(size);
        }
        churn(size);
        usleep(1000);
    }
    if (!strcmp(phase, "first")) {
        reexec(argv, "again");
    }
    printf("%ld\n", count * (long)size);
    return 0;
}

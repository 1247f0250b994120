/* Leaks through a call chain built without frame pointers (-O2 -fomit-frame-pointer):
 * main -> grow -> grow_more -> keep -> malloc, COUNT blocks of SIZE bytes, one every
 * millisecond; beside it, churn -> malloc/free of the same size, which leaves nothing in use.
 * `leak-c COUNT SIZE` prints the bytes it leaked. Only unwind tables (.eh_frame) walk its stack
 * from the allocator's caller back to `main`. */
#include <stdio.h>
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

__attribute__((noipa)) void churn(size_t size) {
    void *p = malloc(size);
    memset(p, 2, size);
    /* The compiler may not drop the pair as dead. */
    __asm__ volatile("" : : "r"(p) : "memory");
    free(p);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: leak-c COUNT SIZE\n");
        return 2;
    }
    long count = atol(argv[1]);
    size_t size = (size_t)atol(argv[2]);
    for (long i = 0; i < count; i++) {
        grow(size);
        churn(size);
        usleep(1000);
    }
    printf("%ld\n", count * (long)size);
    return 0;
}

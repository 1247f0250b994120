/* A CPU-bound program built without frame pointers (-O2 -fomit-frame-pointer): a 100-deep
 * recursion under `descend`, then a hot loop in `burn`, for as many seconds as asked, or for a
 * fixed number of `burn` calls (`deep-c DEPTH 0 CALLS`, for benchmarks). Only unwind tables
 * (.eh_frame) can walk its stacks back to `main`. */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

volatile uint64_t sink;
static time_t deadline;
static long calls;

__attribute__((noipa)) uint64_t burn(uint64_t x) {
    for (int i = 0; i < 100000; i++)
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

__attribute__((noipa)) uint64_t descend(int depth, uint64_t acc) {
    if (depth == 0) {
        if (calls > 0)
            for (long i = 0; i < calls; i++)
                sink += burn(acc + (uint64_t)i);
        else
            while (time(NULL) < deadline)
                sink += burn(acc);
        return acc;
    }
    uint64_t r = descend(depth - 1, acc + (uint64_t)depth);
    /* Work after the call, so the compiler cannot turn the recursion into a loop or a jump. */
    sink += r;
    return r + 1;
}

int main(int argc, char **argv) {
    int depth = argc > 1 ? atoi(argv[1]) : 100;
    int seconds = argc > 2 ? atoi(argv[2]) : 5;
    calls = argc > 3 ? atol(argv[3]) : 0;
    deadline = time(NULL) + seconds;
    sink += descend(depth, 1);
    return 0;
}

// A Go program for the stripped-binary symbolization test: `hotLoop` burns CPU under `work`
// under `main`, for the given number of seconds. Built twice, with and without symbols
// (`-ldflags "-s -w"`, as Go binaries are usually shipped).
package main

import (
	"os"
	"strconv"
	"time"
)

//go:noinline
func hotLoop(n int) uint64 {
	var acc uint64
	for i := 0; i < n; i++ {
		acc = acc*31 + uint64(i)^(acc>>7)
	}
	return acc
}

//go:noinline
func work(d time.Duration) uint64 {
	var sum uint64
	for end := time.Now().Add(d); time.Now().Before(end); {
		sum += hotLoop(1_000_000)
	}
	return sum
}

func main() {
	secs, err := strconv.Atoi(os.Args[1])
	if err != nil {
		panic(err)
	}
	println(work(time.Duration(secs) * time.Second))
}

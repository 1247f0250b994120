// A Go program for the stripped-binary symbolization test: `hotLoop` burns CPU (most of it in
// `mix`, inlined into it) under `work` under `main`, for the given number of seconds. Built
// twice, with and without symbols (`-ldflags "-s -w"`, as Go binaries are usually shipped).
package main

import (
	"os"
	"strconv"
	"time"
)

// mix is small enough for the compiler to inline into hotLoop, where most of the time goes: a
// stripped binary's inlined frames must be named as the build with symbols names them.
func mix(acc uint64, i int) uint64 {
	x := acc*31 + uint64(i)
	x ^= x >> 7
	x *= 0x9e3779b97f4a7c15
	x ^= x >> 29
	return x
}

//go:noinline
func hotLoop(n int) uint64 {
	var acc uint64
	for i := 0; i < n; i++ {
		acc = mix(acc, i)
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

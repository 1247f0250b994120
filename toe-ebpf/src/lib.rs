//! Host stub. The eBPF object is the `toe` binary of this crate, built for bpfel-unknown-none by
//! toe-agent's build script; this library target exists so toe-agent can depend on the crate and
//! cargo rebuilds the object when its sources change.
#![no_std]

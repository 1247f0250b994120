//! TOE's engine: spec -> validated plan ([`plan`]) -> execution ([`run`]) -> artifacts ([`sink`]).
//! Local mode (`toe run`) and node mode share this path.

pub mod allocator;
pub mod collectors;
pub mod ebpf;
pub mod faults;
pub mod plan;
pub mod profile;
pub mod rss;
pub mod run;
pub mod sink;
pub mod symbolize;
pub mod targets;
pub mod tracefs;

//! Threads that waited through the whole run. Their wait began before the program attached, so
//! the kernel side never saw it start, and they never came back, so it never saw it end: a
//! deadlocked or hung service looks exactly like this, and a profile without them would say
//! its threads did not wait at all. At the end of the run every target thread the kernel side
//! never saw switch is read from procfs: if it is asleep, it slept through the whole window, in
//! the kernel functions `/proc/<pid>/task/<tid>/stack` names (the user stack of a sleeping
//! thread cannot be read without stopping it, so it is left out and said so).

use std::{
    collections::{BTreeSet, HashSet},
    fs,
};

use toe_common::offcpu::Reason;

use crate::targets::{self, ResolvedTarget};

/// A target thread asleep since before the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sleeper {
    pub pid: u32,
    pub tid: u32,
    pub process: String,
    pub thread: String,
    pub reason: Reason,
    /// Kernel functions, root first.
    pub kernel: Vec<String>,
}

/// The target's processes now.
fn processes(target: &ResolvedTarget) -> BTreeSet<u32> {
    if target.cgroups.is_empty() {
        let mut all: BTreeSet<u32> = target.tgids.iter().copied().collect();
        all.extend(targets::descendants(&target.tgids));
        return all;
    }
    target
        .cgroups
        .iter()
        .flat_map(|c| targets::cgroup_dirs(&c.path))
        .filter_map(|(dir, _)| fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The state letter and name of a thread, from its `stat`.
fn state_and_name(stat: &str) -> Option<(char, String)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let state = stat.get(close + 2..)?.chars().next()?;
    Some((state, name))
}

/// Function names of a `/proc/<pid>/stack`, root first (`[<0>] futex_wait_queue+0x5e/0x90`).
fn kernel_functions(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|f| f.split('+').next().unwrap_or(f).to_owned())
        .collect();
    v.reverse();
    v
}

/// Every target thread asleep now that is not in `seen` (the threads the kernel side saw
/// switch during the run).
#[must_use]
pub fn sleepers<S: std::hash::BuildHasher>(
    target: &ResolvedTarget,
    seen: &HashSet<u32, S>,
) -> Vec<Sleeper> {
    let mut out = Vec::new();
    for pid in processes(target) {
        let process = targets::process_name(pid).unwrap_or_default();
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if seen.contains(&tid) {
                continue;
            }
            let Some((state, thread)) = fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| state_and_name(&s))
            else {
                continue;
            };
            let reason = match state {
                'S' | 'I' => Reason::Blocked,
                'D' => Reason::Uninterruptible,
                'T' | 't' => Reason::Stopped,
                // Running or runnable (it never left a CPU), or a zombie.
                _ => continue,
            };
            let kernel = fs::read_to_string(task.path().join("stack"))
                .map(|t| kernel_functions(&t))
                .unwrap_or_default();
            out.push(Sleeper {
                pid,
                tid,
                process: process.clone(),
                thread,
                reason,
                kernel,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_stack_parse() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560";
        assert_eq!(state_and_name(stat), Some(('S', "my (odd) name".into())));
        let stack = "[<0>] futex_wait_queue+0x5e/0x90\n[<0>] __futex_wait+0x8a/0x100\n\
                     [<0>] do_syscall_64+0x7f/0x170\n";
        assert_eq!(
            kernel_functions(stack),
            ["do_syscall_64", "__futex_wait", "futex_wait_queue"]
        );
    }

    #[test]
    fn a_thread_of_this_test_asleep_is_found_and_a_seen_one_is_not() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::Builder::new()
            .name("asleep".into())
            .spawn(move || rx.recv())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let me = std::process::id();
        let target = ResolvedTarget {
            description: String::new(),
            cgroups: Vec::new(),
            tgids: vec![me],
        };
        let found = sleepers(&target, &HashSet::<u32>::new());
        let s = found
            .iter()
            .find(|s| s.thread == "asleep")
            .unwrap_or_else(|| panic!("{found:?}"));
        assert_eq!((s.pid, s.reason), (me, Reason::Blocked));
        let seen: HashSet<u32> = [s.tid].into();
        assert!(
            sleepers(&target, &seen)
                .iter()
                .all(|x| x.thread != "asleep")
        );
        tx.send(()).unwrap();
        sleeper.join().unwrap().unwrap();
    }
}

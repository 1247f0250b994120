//! The memory collector against real processes: the demo's leaking, balanced and realloc-heavy
//! call sites (whose true numbers it prints), a forked child, page faults, RSS, and bad input.

use std::{process::Command, time::Duration};

use toe_agent::{run::Ended, targets::TargetSpec};
use toe_common::stacks::folded_reaches_entry;
use toe_tests::{
    assert_rejected, bin, demo, folded_file, loaded_toe_programs, profile, require_root, toe_run,
    tool_spec, workload,
};

/// Sum of the values of folded lines whose stack contains `function` (and, if given, whose root
/// is process `pid`).
fn site_total(lines: &[(String, u64)], function: &str, pid: Option<u32>) -> u64 {
    lines
        .iter()
        .filter(|(stack, _)| stack.split(';').any(|f| f.contains(function)))
        .filter(|(stack, _)| {
            pid.is_none_or(|p| {
                stack
                    .split(';')
                    .next()
                    .is_some_and(|r| r.ends_with(&format!("({p})")))
            })
        })
        .map(|(_, v)| v)
        .sum()
}

/// A memory profile of `leak-c COUNT SIZE [extra...]` with the tool arguments `args`.
fn leak_c(
    args: &[&str],
    count: u64,
    size: u64,
    extra: &[&str],
) -> (toe_agent::run::Outcome, toe_agent::sink::MemorySink) {
    let mut command = vec![
        workload("leak-c").into_os_string(),
        count.to_string().into(),
        size.to_string().into(),
    ];
    command.extend(extra.iter().map(Into::into));
    profile(
        &tool_spec("memory-profile", "60s", args),
        TargetSpec::Command(command),
    )
}

fn leak_command(
    mode_args: &[&str],
    count: &str,
) -> (toe_agent::run::Outcome, toe_agent::sink::MemorySink) {
    profile(
        &tool_spec("memory-profile", "30s", mode_args),
        TargetSpec::Command(vec![
            bin("toe-demo").into_os_string(),
            "leak".into(),
            count.into(),
            "1024".into(),
        ]),
    )
}

#[test]
fn exact_mode_measures_the_leak_and_balances_the_rest() {
    if !require_root("exact_mode_measures_the_leak_and_balances_the_rest") {
        return;
    }
    let (outcome, sink) = leak_command(&["--mode=exact"], "5000");
    assert_eq!(outcome.ended, Ended::CommandExited(0));
    let m = outcome.summary.memory.as_ref().expect("memory section");
    assert!(m.processes.iter().all(|p| p.tracked), "{:?}", m.processes);
    let inuse = folded_file(&sink, "inuse.folded");
    let alloc = folded_file(&sink, "alloc.folded");
    let leaked = 5000 * 1024;
    let got = site_total(&inuse, "leaky_site", None);
    assert!(
        got.abs_diff(leaked) * 100 <= leaked,
        "leak site in use: {got}, leaked {leaked}"
    );
    // Balanced and realloc sites free everything they allocate.
    assert!(site_total(&inuse, "balanced_site", None) * 100 <= leaked / 100);
    assert!(site_total(&inuse, "realloc_site", None) * 100 <= leaked / 100);
    // Exact mode counts every byte: malloc + calloc of 512 bytes, 20000 times, on another thread.
    assert_eq!(site_total(&alloc, "balanced_site", None), 20_000 * 512);
    // realloc from 16 to 64 KiB by doubling, 2000 times: every step allocates the new size.
    let realloc_bytes: u64 = (4..=16).map(|p| 1u64 << p).sum::<u64>() * 2000;
    assert_eq!(site_total(&alloc, "realloc_site", None), realloc_bytes);
    let a = m.allocations.as_ref().unwrap();
    assert_eq!(
        a.lost_live_map_full + a.lost_sites_map_full + a.lost_call_table_full + a.stacks_lost,
        0,
        "{a:?}"
    );
    assert!(a.frees_null >= 20_000, "free(NULL) calls: {}", a.frees_null);
    assert!(
        a.nested_calls >= 2000,
        "realloc(NULL, n) calls malloc inside: {}",
        a.nested_calls
    );
    let art = sink.artifacts.lock().unwrap();
    for f in [
        "heap.pb.gz",
        "inuse.svg",
        "alloc.svg",
        "growth.svg",
        "rss.csv",
        "rss.json",
        "rss.svg",
        "summary.json",
    ] {
        assert!(art.contains_key(f), "{f} missing");
    }
}

/// A leak in a program built without frame pointers (`main` -> `grow` -> `grow_more` -> `keep`
/// -> malloc, beside a `churn` that frees all it allocates) is attributed to its whole call
/// chain up to `main` and the C runtime's entry: tracked allocations reach user space with a
/// copy of their stack, unwound there with the binary's and glibc's tables. By frame pointers
/// the same leak is `keep` with no caller.
#[test]
fn a_leak_without_frame_pointers_is_attributed_to_its_call_chain_up_to_main() {
    let test = "a_leak_without_frame_pointers_is_attributed_to_its_call_chain_up_to_main";
    if !require_root(test) {
        return;
    }
    let (count, size) = (1500u64, 4096u64);
    let run = |unwind: &str| leak_c(&["--mode=exact", unwind], count, size, &[]);
    let (outcome, sink) = run("--unwind=tables");
    assert_eq!(outcome.ended, Ended::CommandExited(0));
    let m = outcome.summary.memory.as_ref().expect("memory section");
    let a = m.allocations.as_ref().expect("allocation accounting");
    let unwind = m.unwind.as_ref().expect("unwind accounting");
    let inuse = folded_file(&sink, "inuse.folded");
    let leaked = count * size;
    let at_keep = site_total(&inuse, "keep", None);
    // Exact mode: every byte the leak left is in the profile, by tables or (a copy the ring
    // could not hold) by frame pointers.
    assert_eq!(at_keep, leaked, "{inuse:?}; {a:?}");
    assert!(site_total(&inuse, "churn", None) == 0, "{inuse:?}");
    let whole: u64 = inuse
        .iter()
        .filter(|(s, _)| s.contains(";main;grow;grow_more;keep") && folded_reaches_entry(s))
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "{whole} of {leaked} leaked bytes through main;grow;grow_more;keep to the entry; \
         copies lost {}; {unwind:?}",
        a.copies_lost
    );
    // Every leaked block is attributed through the whole chain unless its copy found the ring
    // full, which is counted (each lost copy is one block of `keep` or `churn`; on the host none
    // is lost and the two are equal). The ring holds 180 copies and is read every 25 ms, and
    // the workload makes two per millisecond: only a stalled reader loses copies, which under
    // instruction emulation beside other tests happens (11% lost in the 6.12 VM once).
    assert!(
        leaked - whole <= a.copies_lost * size,
        "{} leaked bytes not through the chain, {} copies lost: {inuse:?}; {a:?}; {unwind:?}",
        leaked - whole,
        a.copies_lost
    );
    assert!(whole * 2 >= leaked, "{inuse:?}; {a:?}; {unwind:?}");
    assert_eq!(a.free_events_lost, 0, "{a:?}");
    assert!(unwind.tables > 0 && unwind.copy_errors == 0, "{unwind:?}");
    // The same leak by frame pointers: its chain is not there.
    let (_, sink) = run("--unwind=frame-pointers");
    let inuse = folded_file(&sink, "inuse.folded");
    assert_eq!(site_total(&inuse, "keep", None), leaked, "{inuse:?}");
    assert_eq!(site_total(&inuse, "grow_more", None), 0, "{inuse:?}");
}

/// A process that re-executes itself keeps its pid, and its new image's allocator hands out the
/// addresses of the old image's leaked blocks, whose frees no probe saw: each old block counts as
/// freed when its address comes back, before the new block is tracked, and its free reaches user
/// space before anything of the new block (the old blocks' allocations went there with their
/// stack copies, so a free arriving after the new block's copy would be matched to it).
#[test]
fn an_address_reused_after_exec_frees_the_old_block_before_the_new_one_is_tracked() {
    let test = "an_address_reused_after_exec_frees_the_old_block_before_the_new_one_is_tracked";
    if !require_root(test) {
        return;
    }
    let (count, size) = (500u64, 4096u64);
    let (outcome, sink) = leak_c(&["--mode=exact", "--unwind=tables"], count, size, &["exec"]);
    assert_eq!(outcome.ended, Ended::CommandExited(0));
    let m = outcome.summary.memory.as_ref().expect("memory section");
    let a = m.allocations.as_ref().expect("allocation accounting");
    let inuse = folded_file(&sink, "inuse.folded");
    let leaked = count * size;
    let reused = a.reused_without_free;
    eprintln!("{reused} addresses reused without a free; {a:?}");
    // Without address randomisation the second image's allocations land on the first one's
    // leaked blocks (with glibc, mostly `churn`'s: its block is the one `keep` took next time
    // round). The invariants below hold whichever allocations take them: every old block whose
    // address came back is freed, and every block `retain` leaks is in use. Before the fix, a
    // reused address's free was matched to the new block: `keep` kept all its bytes and
    // `churn`'s own frees found nothing.
    assert!(reused > 0, "no address came back: {a:?}");
    assert_eq!(
        site_total(&inuse, "retain", None),
        leaked,
        "{inuse:?}; {a:?}"
    );
    assert_eq!(
        site_total(&inuse, "keep", None) + reused * size,
        leaked,
        "{inuse:?}; {a:?}"
    );
    assert_eq!(a.free_events_lost, 0, "{a:?}");
}

#[test]
fn sampled_mode_estimates_the_leak_within_ten_percent() {
    if !require_root("sampled_mode_estimates_the_leak_within_ten_percent") {
        return;
    }
    let (outcome, sink) = leak_command(&["--mode=sampled", "--sample-bytes=4KiB"], "5000");
    let m = outcome.summary.memory.as_ref().unwrap();
    let a = m.allocations.as_ref().unwrap();
    assert!(
        a.not_sampled > a.tracked,
        "sampling skipped most calls: {a:?}"
    );
    let inuse = folded_file(&sink, "inuse.folded");
    let leaked = 5000 * 1024;
    let got = site_total(&inuse, "leaky_site", None);
    assert!(
        got.abs_diff(leaked) * 10 <= leaked,
        "estimated leak {got}, leaked {leaked}"
    );
}

#[test]
fn a_child_forked_during_the_run_is_tracked() {
    if !require_root("a_child_forked_during_the_run_is_tracked") {
        return;
    }
    // The fork waits for the run's programs to be in the kernel, and the child leaks 1.5 s
    // later: attaching takes seconds on a slow (emulated) machine, and the child must be
    // probed before it allocates.
    let dir = tempfile::tempdir().expect("temp dir");
    let go = dir.path().join("go");
    let parent = demo(
        &[
            "forkleak",
            "3000",
            "1024",
            "1500",
            go.to_str().expect("utf-8"),
        ],
        None,
    );
    let starter = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while !loaded_toe_programs()
            .iter()
            .any(|p| p.starts_with("toe_mem"))
            && t.elapsed() < Duration::from_mins(1)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(go, b"").expect("go file");
    });
    let (outcome, sink) = profile(
        &tool_spec("memory-profile", "30s", &["--mode=exact"]),
        TargetSpec::Pid(parent.pid()),
    );
    starter.join().expect("starter");
    assert_eq!(outcome.ended, Ended::TargetExited);
    let m = outcome.summary.memory.as_ref().unwrap();
    let child = m
        .processes
        .iter()
        .find(|p| p.pid != parent.pid())
        .unwrap_or_else(|| panic!("child not seen: {:?}", m.processes));
    assert!(child.tracked, "{child:?}");
    let inuse = folded_file(&sink, "inuse.folded");
    let got = site_total(&inuse, "leaky_site", Some(child.pid));
    let leaked = 3000 * 1024;
    assert!(
        got.abs_diff(leaked) * 100 <= leaked,
        "child leak {got} of {leaked}"
    );
}

#[test]
fn growth_profile_blames_the_function_that_touches_memory() {
    if !require_root("growth_profile_blames_the_function_that_touches_memory") {
        return;
    }
    let (outcome, sink) = profile(
        &tool_spec("memory-profile", "30s", &["--mode=growth"]),
        TargetSpec::Command(vec![
            bin("toe-demo").into_os_string(),
            "touch".into(),
            "64".into(),
            // Alive long enough for every faulting site to be symbolized before it exits.
            "3".into(),
        ]),
    );
    let m = outcome.summary.memory.as_ref().unwrap();
    assert!(m.allocations.is_none());
    let faults = folded_file(&sink, "growth.folded");
    let pages = 64 * 256;
    let touched = site_total(&faults, "touch_pages", None);
    let mut heaviest = faults.clone();
    heaviest.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
    heaviest.truncate(4);
    assert!(
        touched >= pages * 9 / 10,
        "faults in touch_pages: {touched} of {pages} pages; heaviest stacks: {heaviest:?}"
    );
    // The leaf is touch_pages itself or code inlined into it (write_volatile).
    let total: u64 = faults.iter().map(|(_, v)| v).sum();
    assert!(
        touched * 10 >= total * 9,
        "touch_pages {touched} of {total} faults"
    );
    assert!(
        m.coverage
            .iter()
            .any(|c| c.contains("not tracked (mode growth)")),
        "{:?}",
        m.coverage
    );
}

/// The growth profile of a program without frame pointers: its page faults (most in `memset`
/// under `churn` and `keep`) are unwound from copies of the faulting task's stack, so they come
/// through their callers to `main` and the program's entry; by frame pointers those callers are
/// not there.
#[test]
fn page_faults_without_frame_pointers_are_attributed_to_their_call_chain_up_to_main() {
    let test = "page_faults_without_frame_pointers_are_attributed_to_their_call_chain_up_to_main";
    if !require_root(test) {
        return;
    }
    // 2000 blocks of 64 KiB, one a millisecond, and as many touched and freed: 16 new pages a
    // millisecond, every 8th fault unwound, so about 2,000 copies a second, well within what
    // the ring's reader keeps up with.
    let run = |unwind: &str| {
        leak_c(
            &["--mode=growth", "--fault-period=8", unwind],
            2000,
            64 << 10,
            &[],
        )
    };
    let (outcome, sink) = run("--unwind=tables");
    assert_eq!(outcome.ended, Ended::CommandExited(0));
    let m = outcome.summary.memory.as_ref().expect("memory section");
    let f = m.page_faults.as_ref().expect("page-fault accounting");
    let unwind = m
        .fault_unwind
        .as_ref()
        .expect("page-fault unwind accounting");
    let growth = folded_file(&sink, "growth.folded");
    // libc's memset (an ifunc: `__memset_<cpu variant>`), not the loader's own.
    let libc_memset = |s: &str| {
        s.rsplit(';')
            .next()
            .is_some_and(|l| l.starts_with("__memset"))
    };
    let in_memset: u64 = growth
        .iter()
        .filter(|(s, _)| libc_memset(s))
        .map(|(_, v)| v)
        .sum();
    let through: u64 = growth
        .iter()
        .filter(|(s, _)| {
            libc_memset(s)
                && (s.contains(";main;churn;") || s.contains(";main;grow;grow_more;keep;"))
                && folded_reaches_entry(s)
        })
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "{through} of {in_memset} faults in memset through their callers to the entry; {f:?}; \
         {unwind:?}"
    );
    // 2000 blocks of 16 pages, every 8th fault unwound and weighted by 8.
    assert!(in_memset >= 2000 * 16 / 2, "{in_memset}: {growth:?}; {f:?}");
    // Every fault in memset comes through its callers unless its copy found the ring full, or
    // its unwinding missed (counted: under emulation the first faults in libc can come before
    // its mapping was read), each weighted by the period.
    let misses = unwind.copy_errors
        + unwind.leaf_not_mapped
        + unwind.leaf_no_unwind_info
        + unwind.leaf_unreadable
        + unwind.leaf_memory_full;
    assert!(
        in_memset - through <= (f.copies_lost + misses) * 8,
        "{} faults in memset not through their callers, {} copies lost, {misses} unwinding \
         misses: {growth:?}; {f:?}; {unwind:?}",
        in_memset - through,
        f.copies_lost
    );
    assert!(through * 2 >= in_memset, "{growth:?}; {f:?}; {unwind:?}");
    // A fault that grows the stack has the page at its stack pointer missing, so its copy can
    // fail (counted): a few at the start, never many.
    assert!(
        unwind.tables > 0 && unwind.copy_errors * 100 <= unwind.tables,
        "{unwind:?}"
    );
    // The same by frame pointers: the callers are not there.
    let (_, sink) = run("--unwind=frame-pointers");
    let growth = folded_file(&sink, "growth.folded");
    assert!(growth.iter().any(|(s, _)| libc_memset(s)), "{growth:?}");
    assert_eq!(
        site_total(&growth, "churn", None) + site_total(&growth, "grow_more", None),
        0,
        "{growth:?}"
    );
}

#[test]
fn rss_series_matches_vmrss() {
    if !require_root("rss_series_matches_vmrss") {
        return;
    }
    let target = demo(&["touch", "96", "30"], None);
    std::thread::sleep(Duration::from_millis(500));
    let (outcome, sink) = profile(
        &tool_spec(
            "memory-profile",
            "2s",
            &["--mode=growth", "--rss-interval=200ms"],
        ),
        TargetSpec::Pid(target.pid()),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", target.pid())).unwrap();
    let vmrss: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    let m = outcome.summary.memory.as_ref().unwrap();
    let series = &m.rss.series[0];
    assert!(series.points >= 8, "readings: {}", series.points);
    assert!(
        series.last_rss.abs_diff(vmrss) * 20 <= vmrss,
        "series {} vs VmRSS {vmrss}",
        series.last_rss
    );
    assert!(vmrss > 96 << 20);
    let csv = String::from_utf8(sink.artifacts.lock().unwrap()["rss.csv"].to_vec()).unwrap();
    assert!(csv.lines().count() > series.points, "{csv}");
}

#[test]
fn bad_memory_input_is_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (&["--leaks=yes"][..], "unknown argument --leaks"),
        (&["--min-size=-1"], "sizes cannot be negative"),
        (&["--sample-bytes=0"], "out of range"),
        (&["--mode=fast"], "not one of sampled, exact, growth"),
        (&["--rss-interval=1ms"], "out of range"),
    ] {
        let out = toe_run(
            dir.path(),
            &tool_spec("memory-profile", "2s", args),
            &["--pid", "1"],
        );
        assert_rejected(&out, want);
    }
}

#[test]
fn a_pid_without_glibc_is_refused_before_attaching() {
    if !require_root("a_pid_without_glibc_is_refused_before_attaching") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("static.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n",
    )
    .unwrap();
    let exe = dir.path().join("static-sleeper");
    let cc = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(cc.success(), "building a static binary (needs libc6-dev)");
    let mut child = Command::new(&exe).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id().to_string();
    let out = toe_run(
        dir.path(),
        &tool_spec("memory-profile", "2s", &["--mode=exact"]),
        &["--pid", &pid],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("statically linked") && err.contains("--mode=growth"),
        "{err}"
    );
    // Growth mode works for the same process.
    let out = toe_run(
        dir.path(),
        &tool_spec("memory-profile", "1s", &["--mode=growth"]),
        &["--pid", &pid],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
}

//! Signal and lifecycle records: the per-process account of how each target process ended, the
//! signal counts, and the timeline. Pure functions over records the collector decoded (their
//! types and the events file are the artifact contract's).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
};

pub use toe_artifacts::summary::signals::{
    Actor, Detail, KindAccounting, ProcessEnd, Record, SignalCount, SignalSummary, jsonl,
};
use toe_artifacts::{esc, timeline};
use toe_common::signals::{
    CLD_DUMPED, CLD_EXITED, CLD_KILLED, DefaultAction, SIGCHLD, SIGKILL, SIGTERM, default_action,
    signal_name,
};

fn fatal_by_default(sig: i32) -> bool {
    matches!(
        default_action(sig),
        DefaultAction::Terminate | DefaultAction::Core
    )
}

#[derive(Default)]
struct Track {
    comm: String,
    first_sigterm: Option<f64>,
    sigkill_after_sigterm: bool,
    /// Latest signal that would end the process if not handled: (index of its record).
    last_fatal: Option<usize>,
    /// Signals the process handled itself (a delivery to a handler or ignored).
    handled: Vec<i32>,
    fatal_delivery: Option<i32>,
    exit: Option<(f64, Option<i32>)>,
    notice: Option<i32>,
    oom: Option<usize>,
}

/// Per target process seen exiting or signalled: what ended it (or that it still runs).
#[must_use]
pub fn endings(records: &[Record]) -> Vec<ProcessEnd> {
    let mut tracks: BTreeMap<u32, Track> = BTreeMap::new();
    // A target's SIGCHLD to a parent that is itself a target arrives as an ordinary signal.
    for r in records {
        if let Detail::Signal {
            signo: SIGCHLD,
            code,
            sender,
            ..
        } = &r.detail
            && let Some(c) = cld_code(code)
        {
            tracks.entry(sender.pid).or_default().notice = Some(c);
        }
    }
    for (i, r) in records.iter().enumerate() {
        if r.pid == 0 {
            continue;
        }
        let t = tracks.entry(r.pid).or_default();
        if !r.comm.is_empty() {
            t.comm.clone_from(&r.comm);
        }
        match &r.detail {
            Detail::Signal { signo, result, .. } => {
                if *signo == SIGTERM && t.first_sigterm.is_none() {
                    t.first_sigterm = Some(r.t_ms);
                }
                if *signo == SIGKILL && t.first_sigterm.is_some() {
                    t.sigkill_after_sigterm = true;
                }
                if t.exit.is_none()
                    && fatal_by_default(*signo)
                    && matches!(result.as_str(), "delivered" | "already_pending")
                {
                    t.last_fatal = Some(i);
                }
            }
            Detail::Delivery { signo, action, .. } => {
                if action == "default" && fatal_by_default(*signo) && *signo != SIGKILL {
                    t.fatal_delivery = Some(*signo);
                } else if *signo != SIGKILL {
                    t.handled.push(*signo);
                }
            }
            Detail::Exit { exit_code } => t.exit = Some((r.t_ms, *exit_code)),
            Detail::ExitNotice { code, .. } => t.notice = cld_code(code).or(t.notice),
            Detail::OomKill { .. } => t.oom = Some(i),
            _ => {}
        }
    }
    tracks
        .into_iter()
        .map(|(pid, t)| ending(pid, &t, records))
        .collect()
}

/// The signal that killed `pid` and its sender: an unhandled signal delivered to the process
/// itself (core-dumping signals take that path), else the latest fatal-by-default signal sent
/// to it that it did not handle (the kernel turns those into an immediate group exit without a
/// delivery of their own). A delivery names the signal but not its sender: the latest sender of
/// that signal is taken.
fn fatal_signal(pid: u32, t: &Track, records: &[Record]) -> Option<(String, Option<Actor>)> {
    let (sig, sender) = t
        .fatal_delivery
        .map(|s| (signal_name(s), None))
        .or_else(|| {
            t.last_fatal
                .filter(|&i| match &records[i].detail {
                    Detail::Signal { signo, .. } => *signo == SIGKILL || !t.handled.contains(signo),
                    _ => false,
                })
                .map(|i| sender_of(records, i))
        })?;
    let sender = sender.or_else(|| {
        records.iter().rev().find_map(|r| match &r.detail {
            Detail::Signal { signal, sender, .. } if r.pid == pid && *signal == sig => {
                Some(sender.clone())
            }
            _ => None,
        })
    });
    Some((sig, sender))
}

fn cld_code(code: &str) -> Option<i32> {
    match code {
        "CLD_EXITED" => Some(CLD_EXITED),
        "CLD_KILLED" => Some(CLD_KILLED),
        "CLD_DUMPED" => Some(CLD_DUMPED),
        _ => None,
    }
}

fn sender_of(records: &[Record], i: usize) -> (String, Option<Actor>) {
    match &records[i].detail {
        Detail::Signal { signal, sender, .. } => (signal.clone(), Some(sender.clone())),
        _ => (String::new(), None),
    }
}

fn ending(pid: u32, t: &Track, records: &[Record]) -> ProcessEnd {
    let mut end = ProcessEnd {
        pid,
        comm: t.comm.clone(),
        sigkill_followed_sigterm: t.sigkill_after_sigterm,
        ..ProcessEnd::default()
    };
    let Some((at, code)) = t.exit else {
        end.how = "still running".into();
        end.explanation = format!("{} ({pid}) did not exit during the run", t.comm);
        return end;
    };
    end.exited_at_ms = Some(at);
    end.after_first_sigterm_ms = t.first_sigterm.map(|s| at - s);
    // The parent notification is the kernel's own verdict when it was seen; without it, a
    // process that called exit() exited, and one that did not was killed.
    let by_signal = match t.notice {
        Some(CLD_EXITED) => false,
        Some(_) => true,
        None => code.is_none(),
    };
    if !by_signal {
        end.how = "exited".into();
        end.exit_code = code.map(|c| c & 0xff);
        end.explanation = format!(
            "{} ({pid}) exited with status {}{}",
            t.comm,
            end.exit_code
                .map_or_else(|| "unknown".into(), |c| c.to_string()),
            t.first_sigterm.map_or_else(String::new, |s| format!(
                ", {:.0} ms after its first SIGTERM",
                at - s
            ))
        );
        return end;
    }
    end.how = if t.notice == Some(CLD_DUMPED) {
        "dumped core".into()
    } else {
        "killed".into()
    };
    if let Some((sig, sender)) = fatal_signal(pid, t, records) {
        end.signal = Some(sig);
        end.sent_by = sender;
    }
    if let Some(i) = t.oom {
        end.oom_killed = Some(true);
        if end.signal.is_none() {
            end.signal = Some(signal_name(SIGKILL));
        }
        if let Detail::OomKill { trigger, .. } = &records[i].detail {
            end.sent_by = Some(Actor {
                comm: format!("oom-killer (via {})", trigger.comm),
                ..trigger.clone()
            });
        }
    }
    let who = end.sent_by.as_ref().map_or_else(String::new, |a| {
        format!(
            " sent by {} ({}{})",
            a.comm,
            a.pid,
            a.cgroup
                .as_deref()
                .map(|c| format!(", cgroup {c}"))
                .unwrap_or_default()
        )
    });
    end.explanation = format!(
        "{} ({pid}) {} by {}{who}{}{}",
        t.comm,
        end.how,
        end.signal.as_deref().unwrap_or("a signal TOE did not see"),
        end.after_first_sigterm_ms
            .map(|ms| format!(", {ms:.0} ms after its first SIGTERM"))
            .unwrap_or_default(),
        if t.sigkill_after_sigterm {
            "; SIGKILL followed the SIGTERM"
        } else {
            ""
        }
    );
    end
}

/// Signals grouped by (signal, sender name, receiver name), most frequent first.
#[must_use]
pub fn signal_counts(records: &[Record]) -> Vec<SignalCount> {
    let mut m: HashMap<(String, String, String), SignalCount> = HashMap::new();
    for r in records {
        if let Detail::Signal {
            signal,
            result,
            sender,
            ..
        } = &r.detail
        {
            let receiver = format!("{} ({})", r.comm, r.pid);
            let sender_name = format!("{} ({})", sender.comm, sender.pid);
            let c = m
                .entry((signal.clone(), sender_name.clone(), receiver.clone()))
                .or_insert_with(|| SignalCount {
                    signal: signal.clone(),
                    sender: sender_name,
                    receiver,
                    ..SignalCount::default()
                });
            c.count += 1;
            *c.results.entry(result.clone()).or_insert(0) += 1;
        }
    }
    let mut v: Vec<SignalCount> = m.into_values().collect();
    v.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.signal.cmp(&b.signal))
            .then_with(|| a.sender.cmp(&b.sender))
    });
    v
}

const LANE_H: f64 = 34.0;
const LEFT: f64 = 220.0;
const PLOT_W: f64 = 900.0;
/// Markers per lane and kind are merged per pixel column: a 100k-signal burst stays a small
/// file, and the tooltip says how many events a mark stands for.
const COLUMNS: f64 = 450.0;

fn float(n: usize) -> f64 {
    f64::from(u32::try_from(n).unwrap_or(u32::MAX))
}

/// (lane, pixel column, shape) -> (events merged, label of the first, colour).
type Marks = BTreeMap<(usize, u32, u8), (u64, String, &'static str)>;

/// What a record looks like on the timeline: shape class, colour, tooltip.
fn mark(r: &Record) -> Option<(u8, &'static str, String)> {
    Some(match &r.detail {
        Detail::Signal {
            signal,
            signo,
            sender,
            result,
            ..
        } => {
            let colour = match *signo {
                SIGKILL => "#d62728",
                SIGTERM => "#ff7f0e",
                _ => "#1f77b4",
            };
            (
                0u8,
                colour,
                format!("{signal} from {} ({}): {result}", sender.comm, sender.pid),
            )
        }
        Detail::Delivery { signal, action, .. } => {
            (1, "#2ca02c", format!("{signal} delivered ({action})"))
        }
        Detail::Exec { filename } => (2, "#9467bd", format!("exec {filename}")),
        Detail::Fork { child } => (2, "#9467bd", format!("fork -> {}", child.pid)),
        Detail::Exit { exit_code } => (
            3,
            "#000000",
            exit_code.map_or_else(|| "exit".into(), |c| format!("exit({})", c & 0xff)),
        ),
        Detail::OomKill { trigger, .. } => (
            4,
            "#8c564b",
            format!("OOM kill (triggered by {})", trigger.comm),
        ),
        Detail::ExitNotice { code, .. } => (3, "#000000", format!("reported {code}")),
        Detail::Joined { .. } | Detail::Left { .. } => return None,
    })
}

/// The events as a lane of the run's shared timeline (deliveries left out: the signal mark
/// already says it).
#[must_use]
pub fn timeline_lane(records: &[Record]) -> timeline::Lane {
    timeline::Lane {
        name: "signals and exits".into(),
        events: records
            .iter()
            .filter_map(|r| {
                let (class, colour, label) = mark(r)?;
                (class != 1).then(|| timeline::Event {
                    t_ms: r.t_ms,
                    label: format!("{} ({}): {label}", r.comm, r.pid),
                    colour: colour.to_owned(),
                })
            })
            .collect(),
        ..timeline::Lane::default()
    }
}

fn marks(records: &[Record], lanes: &[(u32, String)], span: f64) -> Marks {
    let mut out = Marks::new();
    for r in records {
        let Some(lane) = lanes.iter().position(|(p, _)| *p == r.pid) else {
            continue;
        };
        let Some((class, colour, label)) = mark(r) else {
            continue;
        };
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to the plot"
        )]
        let col = ((r.t_ms / span).clamp(0.0, 1.0) * COLUMNS) as u32;
        let first = out.entry((lane, col, class));
        let fresh = matches!(first, std::collections::btree_map::Entry::Vacant(_));
        let m = first.or_insert((0, label.clone(), colour));
        m.0 += 1;
        // A SIGKILL among merged signals gives the mark its colour and its label: on a long
        // run a SIGTERM and the SIGKILL after its grace period share a pixel column, and the
        // kill is what ended the process.
        if colour == "#d62728" && !fresh && m.2 != colour {
            m.1 = label;
            m.2 = colour;
        }
    }
    out
}

fn shape(class: u8, x: f64, y: f64, colour: &str) -> String {
    match class {
        0 => format!(
            r#"<path d="M{x},{} l-4,-8 h8 z" fill="{colour}"/>"#,
            y - 2.0
        ),
        1 => format!(
            r#"<circle cx="{x}" cy="{}" r="3" fill="{colour}"/>"#,
            y + 6.0
        ),
        2 => format!(
            r#"<rect x="{}" y="{}" width="7" height="7" fill="{colour}"/>"#,
            x - 3.5,
            y - 3.5
        ),
        3 => format!(
            r#"<path d="M{},{} l8,8 m0,-8 l-8,8" stroke="{colour}" stroke-width="2"/>"#,
            x - 4.0,
            y - 4.0
        ),
        _ => format!(
            r#"<rect x="{}" y="{}" width="9" height="9" fill="{colour}" transform="rotate(45 {x} {y})"/>"#,
            x - 4.5,
            y - 4.5
        ),
    }
}

/// A timeline with one lane per process: signals received (colour by signal), deliveries, exec,
/// fork, exit and OOM kills. Hand-written SVG: a handful of shapes, no charting library needed.
#[must_use]
pub fn timeline_svg(records: &[Record], duration_ms: f64, title: &str) -> String {
    let mut lanes: Vec<(u32, String)> = Vec::new();
    for r in records {
        if r.pid != 0 && !lanes.iter().any(|(p, _)| *p == r.pid) {
            lanes.push((r.pid, r.comm.clone()));
        }
    }
    let span = duration_ms.max(1.0);
    let rows = float(lanes.len().max(1));
    let height = 70.0 + LANE_H * rows + 40.0;
    let width = LEFT + PLOT_W + 30.0;
    let mut o = timeline::svg_start(width, height, title, 20.0);
    let legend = [
        ("#d62728", "SIGKILL"),
        ("#ff7f0e", "SIGTERM"),
        ("#1f77b4", "other signal"),
        ("#2ca02c", "delivery"),
        ("#9467bd", "exec/fork"),
        ("#000000", "exit"),
        ("#8c564b", "OOM kill"),
    ];
    for (i, (colour, name)) in legend.iter().enumerate() {
        let x = 10.0 + float(i) * 120.0;
        let _ = writeln!(
            o,
            r#"<rect x="{x}" y="32" width="10" height="10" fill="{colour}"/><text x="{}" y="41">{name}</text>"#,
            x + 14.0
        );
    }
    let top = 60.0;
    for (i, (pid, comm)) in lanes.iter().enumerate() {
        let y = top + LANE_H * float(i);
        let _ = writeln!(
            o,
            r##"<text x="10" y="{}">{} ({pid})</text><line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#ccc"/>"##,
            y + 20.0,
            esc(comm),
            y + 16.0,
            LEFT + PLOT_W,
            y + 16.0
        );
    }
    for ((lane, col, class), (n, label, colour)) in &marks(records, &lanes, span) {
        let x = LEFT + f64::from(*col) / COLUMNS * PLOT_W;
        let y = top + LANE_H * float(*lane) + 16.0;
        let tip = if *n > 1 {
            format!("{label} (+{} more here)", n - 1)
        } else {
            label.clone()
        };
        let _ = writeln!(
            o,
            "<g><title>{}</title>{}</g>",
            esc(&tip),
            shape(*class, x, y, colour)
        );
    }
    let axis_y = top + LANE_H * rows + 10.0;
    for k in 0..=5 {
        let x = LEFT + PLOT_W * f64::from(k) / 5.0;
        let _ = writeln!(
            o,
            r##"<line x1="{x}" y1="{axis_y}" x2="{x}" y2="{}" stroke="#888"/><text x="{x}" y="{}" text-anchor="middle">{:.1}s</text>"##,
            axis_y + 5.0,
            axis_y + 18.0,
            span * f64::from(k) / 5.0 / 1000.0
        );
    }
    if lanes.is_empty() {
        let _ = writeln!(
            o,
            r#"<text x="{LEFT}" y="{}">no target process was signalled, started or ended during the run</text>"#,
            top + 20.0
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: f64, pid: u32, detail: Detail) -> Record {
        Record {
            t_ms: t,
            time_unix_ns: 0,
            pid,
            tid: pid,
            comm: "app".into(),
            detail,
        }
    }

    fn signal(sig: i32, from: &str, result: &str) -> Detail {
        Detail::Signal {
            signal: signal_name(sig),
            signo: sig,
            code: "SI_USER".into(),
            result: result.into(),
            scope: "process".into(),
            sender: Actor {
                pid: 99,
                tid: 99,
                comm: from.into(),
                cgroup: None,
            },
            user_stack: vec![],
            kernel_stack: vec![],
        }
    }

    #[test]
    fn sigterm_ignored_then_sigkill_is_the_cause_with_grace_time() {
        let recs = vec![
            rec(100.0, 7, signal(SIGTERM, "kubelet", "delivered")),
            rec(
                101.0,
                7,
                Detail::Delivery {
                    signal: "SIGTERM".into(),
                    signo: SIGTERM,
                    code: "SI_USER".into(),
                    action: "handler".into(),
                },
            ),
            rec(30_100.0, 7, signal(SIGKILL, "kubelet", "delivered")),
            rec(30_101.0, 7, Detail::Exit { exit_code: None }),
            rec(
                30_102.0,
                7,
                Detail::ExitNotice {
                    code: "CLD_KILLED".into(),
                    parent: 1,
                },
            ),
        ];
        let e = &endings(&recs)[0];
        assert_eq!(e.how, "killed");
        assert_eq!(e.signal.as_deref(), Some("SIGKILL"));
        assert_eq!(e.sent_by.as_ref().unwrap().comm, "kubelet");
        assert!(e.sigkill_followed_sigterm);
        assert_eq!(e.after_first_sigterm_ms, Some(30_001.0));
    }

    #[test]
    fn unhandled_sigterm_kills_without_a_delivery_and_exit_calls_are_exits() {
        let recs = vec![
            rec(5.0, 8, signal(SIGTERM, "bystander", "delivered")),
            rec(6.0, 8, Detail::Exit { exit_code: None }),
            rec(
                1.0,
                9,
                Detail::Exit {
                    exit_code: Some(0x103),
                },
            ),
        ];
        let ends = endings(&recs);
        let killed = ends.iter().find(|e| e.pid == 8).unwrap();
        assert_eq!(killed.signal.as_deref(), Some("SIGTERM"));
        assert_eq!(killed.sent_by.as_ref().unwrap().comm, "bystander");
        assert!(!killed.sigkill_followed_sigterm);
        let exited = ends.iter().find(|e| e.pid == 9).unwrap();
        assert_eq!((exited.how.as_str(), exited.exit_code), ("exited", Some(3)));
    }

    #[test]
    fn a_core_dump_is_named_by_its_delivery() {
        let recs = vec![
            rec(
                1.0,
                5,
                Detail::Delivery {
                    signal: "SIGSEGV".into(),
                    signo: 11,
                    code: "SEGV_MAPERR".into(),
                    action: "default".into(),
                },
            ),
            rec(2.0, 5, Detail::Exit { exit_code: None }),
            rec(
                3.0,
                5,
                Detail::ExitNotice {
                    code: "CLD_DUMPED".into(),
                    parent: 1,
                },
            ),
        ];
        let e = &endings(&recs)[0];
        assert_eq!(e.how, "dumped core");
        assert_eq!(e.signal.as_deref(), Some("SIGSEGV"));
    }

    #[test]
    fn a_sigkill_merged_with_earlier_signals_names_the_mark() {
        // A 60 s run: the SIGTERM and the SIGKILL 300 ms later share a pixel column.
        let recs = [
            rec(30_000.0, 3, signal(15, "bystander", "delivered")),
            rec(30_300.0, 3, signal(9, "bystander", "delivered")),
        ];
        let svg = timeline_svg(&recs, 60_000.0, "t");
        assert!(svg.contains("SIGKILL from bystander"), "{svg}");
        assert!(svg.contains("#d62728"), "{svg}");
    }

    #[test]
    fn timeline_merges_a_burst_into_few_marks() {
        let recs: Vec<Record> = (0..10_000)
            .map(|i| rec(f64::from(i) / 10.0, 3, signal(10, "x", "already_pending")))
            .collect();
        let svg = timeline_svg(&recs, 1000.0, "t");
        assert!(svg.matches("<g>").count() <= 451);
        assert!(svg.contains("more here"));
        let counts = signal_counts(&recs);
        assert_eq!(counts[0].count, 10_000);
    }
}

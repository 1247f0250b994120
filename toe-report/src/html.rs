//! The self-contained HTML report: findings first, then interactive flamegraphs (search and
//! zoom; the tree data and a small script are embedded), RSS charts, each capture's signal and
//! fault timeline, the fault table (asked vs achieved), and every capture's accounting. One file,
//! no external requests, so it can be mailed, attached to an incident or served as is.

use std::{collections::HashMap, fmt::Write as _};

use base64::Engine as _;
use toe_artifacts::{esc, folded::Folded};

use crate::{
    capture::{Capture, ProfileKind},
    rules::{Finding, Severity, Source},
};

/// What goes into one report.
pub struct Report<'a> {
    pub title: &'a str,
    /// Human-readable: when, which window, how many runs.
    pub meta: &'a str,
    pub captures: &'a [Capture],
    /// Merged profiles over every capture, by kind.
    pub merged: &'a [(ProfileKind, Folded)],
    pub findings: &'a [Finding],
    /// Things the reader must know (model step failed, inputs skipped).
    pub notes: &'a [String],
    /// Other outputs of the same processing, as (label, relative link).
    pub files: &'a [(String, String)],
}

/// Frames below this share of the whole graph are not embedded: at any screen width they are
/// under a pixel, and leaving them out bounds the report's size for huge merged profiles.
const PRUNE_SHARE: f64 = 0.0002;

/// Events shown per capture; the rest are counted (they stay in the capture's events.jsonl).
const MAX_EVENTS: usize = crate::capture::KEPT_EVENTS;

#[derive(Default)]
struct Node {
    name: u32,
    value: u64,
    children: HashMap<u32, usize>,
}

/// The merged tree as `{"names": [...], "tree": [name, value, [children]], "hidden": n}`.
#[must_use]
pub fn tree_json(f: &Folded) -> String {
    let mut names: Vec<&str> = vec!["all"];
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut nodes = vec![Node::default()];
    for (stack, &count) in &f.stacks {
        nodes[0].value += count;
        let mut at = 0;
        for frame in stack.split(';') {
            let name = *index.entry(frame).or_insert_with(|| {
                names.push(frame);
                u32::try_from(names.len() - 1).unwrap_or(u32::MAX)
            });
            let next = nodes.len();
            let child = *nodes[at].children.entry(name).or_insert(next);
            if child == next {
                nodes.push(Node {
                    name,
                    ..Node::default()
                });
            }
            nodes[child].value += count;
            at = child;
        }
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a threshold in counts"
    )]
    let min = (nodes[0].value as f64 * PRUNE_SHARE).ceil() as u64;
    let mut hidden = 0u64;
    let mut tree = String::new();
    write_node(&nodes, 0, min, &mut hidden, &mut tree);
    let names = serde_json::to_string(&names).expect("strings serialize");
    format!("{{\"names\":{names},\"tree\":{tree},\"hidden\":{hidden}}}")
}

fn write_node(nodes: &[Node], i: usize, min: u64, hidden: &mut u64, out: &mut String) {
    let n = &nodes[i];
    let _ = write!(out, "[{},{}", n.name, n.value);
    let mut kids: Vec<usize> = n.children.values().copied().collect();
    // Children in name order, as flamegraph.pl orders them: two reports compare side by side.
    kids.sort_by_key(|&k| nodes[k].name);
    let mut first = true;
    for k in kids {
        if nodes[k].value < min {
            *hidden += count_nodes(nodes, k);
            continue;
        }
        out.push_str(if first { ",[" } else { "," });
        first = false;
        write_node(nodes, k, min, hidden, out);
    }
    if !first {
        out.push(']');
    }
    out.push(']');
}

fn count_nodes(nodes: &[Node], i: usize) -> u64 {
    1 + nodes[i]
        .children
        .values()
        .map(|&k| count_nodes(nodes, k))
        .sum::<u64>()
}

#[must_use]
pub fn render(r: &Report<'_>) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{}</title><style>{}</style></head><body>",
        esc(r.title),
        include_str!("report.css")
    );
    let _ = write!(
        h,
        "<header><h1>{}</h1><div class=\"meta\">{}</div></header>",
        esc(r.title),
        esc(r.meta)
    );
    h.push_str("<nav><a href=\"#findings\">Findings</a><a href=\"#flamegraphs\">Flamegraphs</a><a href=\"#memory\">Memory</a><a href=\"#timelines\">Timelines</a><a href=\"#faults\">Faults</a><a href=\"#captures\">Captures</a></nav><main>");
    findings(&mut h, r);
    flamegraphs(&mut h, r);
    memory(&mut h, r.captures);
    timelines(&mut h, r.captures);
    faults(&mut h, r.captures);
    captures(&mut h, r);
    let _ = write!(
        h,
        "</main><script>{}</script></body></html>",
        include_str!("report.js")
    );
    h.push('\n');
    h
}

fn findings(h: &mut String, r: &Report<'_>) {
    h.push_str("<section id=\"findings\"><h2>Findings</h2>");
    for n in r.notes {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(n));
    }
    if r.findings.is_empty() {
        h.push_str("<p>No rule found a cause in these captures. The flamegraphs and timelines below are the whole story.</p>");
    }
    for f in r.findings {
        let severity = match f.severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        let (badge_class, badge) = match f.source {
            Source::Rule => ("rule", format!("rule: {}", f.rule)),
            Source::Model => ("model", "model".to_owned()),
        };
        let _ = write!(
            h,
            "<div class=\"finding {severity}\" data-source=\"{badge_class}\"><span class=\"badge {badge_class}\">{}</span><strong>{}</strong><ul>",
            esc(&badge),
            esc(&f.title)
        );
        for e in &f.evidence {
            let _ = write!(h, "<li>{}</li>", esc(e));
        }
        h.push_str("</ul>");
        if !f.seen_in.is_empty() {
            let _ = write!(
                h,
                "<div class=\"seen\">seen in: {}</div>",
                esc(&f.seen_in.join(", "))
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</section>");
}

fn flamegraphs(h: &mut String, r: &Report<'_>) {
    h.push_str("<section id=\"flamegraphs\"><h2>Flamegraphs</h2>");
    if r.merged.is_empty() {
        h.push_str("<p>No profile was collected in these captures.</p>");
    }
    for (kind, f) in r.merged {
        // Inside a script element nothing of a capture may read as markup: '<', '>' and '&' as
        // JSON escapes (the parsed strings are the same), so no `</script>` or `<!--` appears.
        let data = tree_json(f)
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026");
        let _ = write!(
            h,
            "<div class=\"flame\" id=\"flame-{name}\" data-unit=\"{unit}\"><div class=\"flame-bar\"><h3>{title}: {total} {unit}, merged over every capture</h3><input class=\"flame-search\" type=\"search\" placeholder=\"search functions\" aria-label=\"search {name}\"><button class=\"flame-reset\" type=\"button\">reset zoom</button></div><div class=\"flame-status\"></div><div class=\"flame-frames\"></div><script type=\"application/json\">{data}</script></div>",
            name = kind.name(),
            unit = kind.unit(),
            title = esc(kind.title()),
            total = f.total(),
        );
    }
    if !r.files.is_empty() {
        h.push_str("<p>Files: ");
        for (label, link) in r.files {
            let _ = write!(h, "<a href=\"{}\">{}</a> ", esc(link), esc(label));
        }
        h.push_str("</p>");
    }
    h.push_str("</section>");
}

fn memory(h: &mut String, caps: &[Capture]) {
    h.push_str("<section id=\"memory\"><h2>Memory</h2>");
    let with_rss: Vec<&Capture> = caps.iter().filter(|c| !c.rss.is_empty()).collect();
    if with_rss.is_empty() {
        h.push_str("<p>No RSS series in these captures.</p>");
    }
    for c in with_rss {
        let _ = write!(
            h,
            "<h3>{} {}</h3>{}",
            esc(&c.run),
            esc(&c.target),
            // The agent's own rss.svg chart, drawn from the same series.
            toe_artifacts::rss::chart(&c.rss, &format!("RSS of {}", c.target))
        );
    }
    h.push_str("</section>");
}

fn timelines(h: &mut String, caps: &[Capture]) {
    h.push_str("<section id=\"timelines\"><h2>Signal, lifecycle and fault timelines</h2>");
    let mut any = false;
    for c in caps {
        if c.timeline_svg.is_none() && c.events.is_empty() {
            continue;
        }
        any = true;
        let _ = write!(h, "<h3>{} {}</h3>", esc(&c.run), esc(&c.target));
        if let Some(svg) = &c.timeline_svg {
            // As an image: the agent's SVG keeps its own ids and styles to itself.
            let _ = write!(
                h,
                "<img class=\"timeline\" alt=\"timeline of {}\" src=\"data:image/svg+xml;base64,{}\">",
                esc(&c.target),
                base64::engine::general_purpose::STANDARD.encode(svg)
            );
        }
        if !c.events.is_empty() {
            h.push_str("<table><tr><th>ms</th><th>process</th><th>event</th><th>detail</th></tr>");
            for e in c.events.iter().take(MAX_EVENTS) {
                let mut detail = Vec::new();
                if let Some(s) = &e.signal {
                    detail.push(s.clone());
                }
                if let Some(s) = &e.sender {
                    detail.push(format!("from {} ({})", s.comm, s.pid));
                }
                for v in [&e.result, &e.action, &e.victim_comm].into_iter().flatten() {
                    detail.push(v.clone());
                }
                if let Some(code) = e.exit_code {
                    detail.push(format!("status {code}"));
                }
                let _ = write!(
                    h,
                    "<tr><td class=\"num\">{:.1}</td><td>{} ({})</td><td>{}</td><td>{}</td></tr>",
                    e.t_ms,
                    // oom_kill events name the victim apart from the task that triggered them.
                    esc(if e.comm.is_empty() {
                        e.victim_comm.as_deref().unwrap_or_default()
                    } else {
                        &e.comm
                    }),
                    e.pid,
                    esc(&e.event),
                    esc(&detail.join(" "))
                );
            }
            h.push_str("</table>");
            let more = c.events.len().saturating_sub(MAX_EVENTS) as u64 + c.events_more;
            if more > 0 {
                let _ = write!(
                    h,
                    "<p class=\"note\">{more} more events in {}/events.jsonl</p>",
                    esc(&c.dir)
                );
            }
        }
    }
    if !any {
        h.push_str("<p>No signal or fault timeline in these captures.</p>");
    }
    h.push_str("</section>");
}

fn faults(h: &mut String, caps: &[Capture]) {
    h.push_str("<section id=\"faults\"><h2>Faults: asked vs achieved</h2>");
    let with: Vec<&Capture> = caps.iter().filter(|c| c.summary.fault.is_some()).collect();
    if with.is_empty() {
        h.push_str("<p>No fault was injected in these captures.</p></section>");
        return;
    }
    h.push_str("<table><tr><th>run</th><th>target</th><th>fault</th><th>asked</th><th>achieved</th><th>error</th><th>leftovers</th><th>plan</th></tr>");
    for c in with {
        let f = c.summary.fault.as_ref().expect("filtered");
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.2} {}</td><td class=\"num\">{:.2} {}</td><td class=\"num\">{:+.1}%</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&c.run),
            esc(&c.target),
            esc(&f.fault),
            f.asked,
            esc(&f.unit),
            f.achieved,
            esc(&f.unit),
            f.error_percent,
            f.leftovers,
            esc(&f.plan.join("; "))
        );
    }
    h.push_str("</table></section>");
}

fn captures(h: &mut String, r: &Report<'_>) {
    h.push_str("<section id=\"captures\"><h2>Captures and their accounting</h2><table><tr><th>run</th><th>target</th><th>tool</th><th>ended</th><th>seconds</th><th>CPU samples (lost)</th><th>signal events lost</th><th>warnings</th></tr>");
    for c in r.captures {
        let s = &c.summary;
        let cpu = s.cpu.as_ref().map_or_else(String::new, |cpu| {
            format!("{} ({})", cpu.samples.recorded, cpu.samples.lost())
        });
        let lost = s
            .signals
            .as_ref()
            .map_or_else(String::new, |x| x.lost_total.to_string());
        let mut tool = s.tool.clone();
        if !s.alongside.is_empty() {
            let _ = write!(tool, " + {}", s.alongside.join(", "));
        }
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&c.run),
            esc(&c.target),
            esc(&tool),
            esc(&s.ended),
            if s.complete { "" } else { " (partial)" },
            s.sampled_duration_s,
            cpu,
            lost,
            esc(&s.warnings.join("; "))
        );
    }
    h.push_str("</table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::fixtures::capture;

    #[test]
    fn tree_keeps_totals_and_prunes_invisible_frames() {
        let mut f = Folded::parse("p;a;x 9000\np;b 1000\n").unwrap();
        f.add("p;tiny".into(), 1);
        let json: serde_json::Value = serde_json::from_str(&tree_json(&f)).unwrap();
        assert_eq!(json["tree"][1], 10_001);
        assert_eq!(json["hidden"], 1);
        assert_eq!(json["names"][0], "all");
    }

    /// A frame name from a hostile capture cannot end the script element its flamegraph's data
    /// sits in, and the data still parses to the same name.
    #[test]
    fn frame_names_in_the_embedded_data_cannot_read_as_markup() {
        let hostile = "</script><img src=x onerror=alert(1)><!--&";
        let mut f = Folded::default();
        f.add(format!("p;{hostile}"), 5);
        let page = render(&Report {
            title: "t",
            meta: "m",
            captures: &[],
            merged: &[(ProfileKind::Cpu, f)],
            findings: &[],
            notes: &[],
            files: &[],
        });
        assert!(
            !page.contains("<img"),
            "markup from a frame name in the page"
        );
        assert!(!page.contains("<!--&"));
        let start = page.find("<script type=\"application/json\">").unwrap();
        let data = &page[start..];
        let data = &data[data.find('>').unwrap() + 1..data.find("</script>").unwrap()];
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        assert!(
            json["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == hostile),
            "{json}"
        );
    }

    #[test]
    fn report_has_every_section_and_escapes_names() {
        let caps = [capture("cpu"), capture("term-hung"), capture("leak")];
        let findings = crate::rules::evaluate(&caps);
        let mut cpu = Folded::default();
        cpu.merge(&caps[0].profiles[&ProfileKind::Cpu], None);
        cpu.add("evil;</script><b>x".into(), 3);
        let merged = [(ProfileKind::Cpu, cpu)];
        let html = render(&Report {
            title: "t <1>",
            meta: "m",
            captures: &caps,
            merged: &merged,
            findings: &findings,
            notes: &["model step skipped".into()],
            files: &[],
        });
        for id in [
            "findings",
            "flamegraphs",
            "memory",
            "timelines",
            "faults",
            "captures",
        ] {
            assert!(html.contains(&format!("<section id=\"{id}\"")), "{id}");
        }
        assert!(html.contains("t &lt;1&gt;"));
        assert!(
            !html.contains("</script><b>"),
            "a frame name must not end the data script"
        );
        assert!(html.contains("rule: sigterm-unhandled"));
        assert!(html.contains("data:image/svg+xml;base64,"));
        assert!(html.contains("<polyline"), "RSS chart");
    }
}

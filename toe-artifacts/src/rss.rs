//! RSS over time per target process and cgroup: the series (`rss.json`), their summary, and
//! their encodings: CSV, an SVG chart (the agent's `rss.svg`, and inlined in the HTML report),
//! and a lane of the run's shared timeline.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{esc, timeline};

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RssPoint {
    /// Milliseconds since collection started.
    pub t_ms: u64,
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Series {
    /// `process` or `cgroup`.
    pub kind: String,
    /// `name (pid)` or the cgroup path.
    pub source: String,
    pub pid: Option<u32>,
    pub points: Vec<RssPoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SeriesSummary {
    pub kind: String,
    pub source: String,
    pub points: usize,
    pub first_rss: u64,
    pub last_rss: u64,
    pub peak_rss: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RssSummary {
    pub interval_ms: u64,
    pub series: Vec<SeriesSummary>,
}

/// The RSS curves as a lane of the run's shared timeline: every cgroup, and the processes with
/// the highest peaks (a lane of fifty lines reads as noise).
#[must_use]
pub fn timeline_lane(series: &[Series]) -> timeline::Lane {
    const PROCESSES: usize = 4;
    let peak = |s: &Series| s.points.iter().map(|p| p.rss).max().unwrap_or(0);
    let mut processes: Vec<&Series> = series.iter().filter(|s| s.kind != "cgroup").collect();
    processes.sort_by_key(|s| std::cmp::Reverse(peak(s)));
    let chosen = series
        .iter()
        .filter(|s| s.kind == "cgroup")
        .chain(processes.into_iter().take(PROCESSES));
    timeline::Lane {
        name: "memory-profile: RSS".into(),
        unit: "bytes".into(),
        series: chosen
            .map(|s| timeline::Series {
                name: s.source.clone(),
                #[expect(clippy::cast_precision_loss, reason = "values for display")]
                points: s
                    .points
                    .iter()
                    .map(|p| (p.t_ms as f64, p.rss as f64))
                    .collect(),
            })
            .collect(),
        ..timeline::Lane::default()
    }
}

#[must_use]
pub fn csv(series: &[Series]) -> String {
    let mut o =
        String::from("time_s,kind,source,pid,rss_bytes,anon_bytes,file_bytes,shmem_bytes\n");
    for s in series {
        // Sources are process names or paths: quote them, doubling quotes (RFC 4180).
        let source = format!("\"{}\"", s.source.replace('"', "\"\""));
        for p in &s.points {
            let _ = writeln!(
                o,
                "{}.{:03},{},{source},{},{},{},{},{}",
                p.t_ms / 1000,
                p.t_ms % 1000,
                s.kind,
                s.pid.map(|p| p.to_string()).unwrap_or_default(),
                p.rss,
                p.anon,
                p.file,
                p.shmem
            );
        }
    }
    o
}

/// A line chart of RSS per series. Written by hand: it is a handful of SVG elements, and the
/// plotting crates need a font stack just to measure axis labels.
#[must_use]
pub fn svg(series: &[Series], title: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}",
        chart(series, title)
    )
}

/// The chart of [`svg`] as an `<svg>` element, to inline in HTML.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "pixel coordinates")]
pub fn chart(series: &[Series], title: &str) -> String {
    const W: f64 = 960.0;
    const H: f64 = 420.0;
    const L: f64 = 80.0;
    const R: f64 = 260.0;
    const T: f64 = 40.0;
    const B: f64 = 40.0;
    const COLOURS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let last_ms = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.t_ms))
        .max()
        .unwrap_or(0)
        .max(1);
    let peak = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.rss))
        .max()
        .unwrap_or(0)
        .max(1);
    let px = |t: u64| L + (t as f64 / last_ms as f64) * (W - L - R);
    let py = |v: u64| H - B - (v as f64 / peak as f64) * (H - T - B);
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{L}" y="22" font-size="15">{}</text>
"#,
        esc(title)
    );
    for i in 0..=4u64 {
        let v = peak * i / 4;
        let yy = py(v);
        let _ = writeln!(
            o,
            r##"<line x1="{L}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            yy + 4.0,
            esc(&crate::bytes(v))
        );
        let t = last_ms * i / 4;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.1}s</text>"#,
            px(t),
            H - B + 18.0,
            t as f64 / 1000.0
        );
    }
    if series.iter().all(|s| s.points.is_empty()) {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">no RSS readings (targets gone before the first reading)</text>"#,
            f64::midpoint(W - R, L),
            H / 2.0
        );
    }
    let mut shown: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    shown.sort_by_key(|s| std::cmp::Reverse(s.points.iter().map(|p| p.rss).max()));
    for (i, s) in shown.iter().take(COLOURS.len()).enumerate() {
        let c = COLOURS[i];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.t_ms), py(p.rss)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&s.source)
        );
        let ly = T + 16.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{}" y="{:.1}">{} {}</text>"#,
            W - R + 16.0,
            ly - 4.0,
            W - R + 34.0,
            ly,
            esc(&s.kind),
            esc(&s.source)
        );
    }
    if shown.len() > COLOURS.len() {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}">+{} more in rss.csv</text>"#,
            W - R + 16.0,
            T + 16.0 * COLOURS.len() as f64,
            shown.len() - COLOURS.len()
        );
    }
    o.push_str("</svg>\n");
    o
}

pub fn render(o: &mut String, r: &RssSummary) {
    use crate::bytes;
    for s in r.series.iter().take(6) {
        let _ = writeln!(
            o,
            "  rss {} {}: {} -> {} (peak {}, {} readings every {} ms)",
            s.kind,
            s.source,
            bytes(s.first_rss),
            bytes(s.last_rss),
            bytes(s.peak_rss),
            s.points,
            r.interval_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_chart_of_a_series() {
        let series = vec![Series {
            kind: "process".into(),
            source: "app (7)".into(),
            pid: Some(7),
            points: vec![
                RssPoint {
                    t_ms: 0,
                    rss: 1 << 20,
                    ..RssPoint::default()
                },
                RssPoint {
                    t_ms: 1000,
                    rss: 3 << 20,
                    ..RssPoint::default()
                },
            ],
        }];
        let text = csv(&series);
        assert!(text.lines().nth(1).unwrap().starts_with("0.0"), "{text}");
        let svg = svg(&series, "t <&>");
        assert!(svg.starts_with("<?xml") && svg.contains("<polyline"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(chart(&series, "t").starts_with("<svg"));
    }
}

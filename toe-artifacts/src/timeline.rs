//! The run's shared timeline: every tool of one PowerTool on one time axis (milliseconds since
//! the run started), so a fault's asked-versus-achieved curve lines up with what the collectors
//! saw at the same moment (on-CPU samples, RSS, signals, exits). Pure: built from the tools'
//! summaries, encoded as JSON (for reports) and SVG (to look at).
//!
//! The SVG is written by hand, like the signal timeline: a handful of polylines and marks, which
//! no plotting crate for the field produces without a browser or a font stack.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::esc;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    pub start_unix_ns: u64,
    pub duration_ms: f64,
    pub lanes: Vec<Lane>,
}

/// One horizontal band: series sharing a unit, reference levels, and point events.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Lane {
    pub name: String,
    /// `bytes`, `CPUs`, `percent`, `samples/s`, `processes`, or empty for an events-only lane.
    pub unit: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<Series>,
    /// Horizontal lines: what was asked, a limit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<Level>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub name: String,
    /// (milliseconds since the start, value).
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Level {
    pub name: String,
    pub value: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub t_ms: f64,
    pub label: String,
    pub colour: String,
}

/// Running totals sampled over time -> the rate per second over each interval, plotted at the
/// interval's end.
#[must_use]
pub fn rate_per_second(totals: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut prev = (0.0, 0);
    let mut out = Vec::with_capacity(totals.len());
    for &(t, n) in totals {
        if t > prev.0 {
            #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
            let r = n.saturating_sub(prev.1) as f64 * 1000.0 / (t - prev.0);
            out.push((t, r));
        }
        prev = (t, n);
    }
    out
}

const LEFT: f64 = 200.0;
const PLOT_W: f64 = 900.0;
const LANE_H: f64 = 110.0;
const PALETTE: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

/// A value in the lane's unit, short enough for an axis label.
#[must_use]
pub fn format_value(v: f64, unit: &str) -> String {
    match unit {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "whole bytes for display"
        )]
        "bytes" => crate::bytes(v.max(0.0) as u64),
        "CPUs" => format!("{v:.2} CPUs"),
        "threads" => format!("{v:.2} threads"),
        "percent" => format!("{v:.1}%"),
        _ => format!("{v:.0} {unit}"),
    }
}

impl Lane {
    /// The top of the lane's y axis: everything drawn fits under it, with headroom.
    fn top(&self) -> f64 {
        let highest = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(self.levels.iter().map(|l| l.value))
            .fold(0.0_f64, f64::max);
        if highest > 0.0 { highest * 1.1 } else { 1.0 }
    }
}

/// An SVG document's opening: size, white background, and the title at `title_y`; the timelines
/// of the agent and of processing start the same way.
#[must_use]
pub fn svg_start(width: f64, height: f64, title: &str, title_y: f64) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="{title_y}" font-size="15">{}</text>"#,
        esc(title)
    );
    o
}

/// Renders the timeline; hover a mark or a line for its details.
#[must_use]
pub fn svg(t: &Timeline, title: &str) -> String {
    let span = t.duration_ms.max(1.0);
    #[expect(clippy::cast_precision_loss, reason = "a handful of lanes")]
    let rows = t.lanes.len().max(1) as f64;
    let height = 50.0 + LANE_H * rows + 30.0;
    let width = LEFT + PLOT_W + 30.0;
    let x_of = |ms: f64| LEFT + (ms / span).clamp(0.0, 1.0) * PLOT_W;
    let mut o = svg_start(width, height, title, 22.0);
    for (i, lane) in t.lanes.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a handful of lanes")]
        let y0 = 40.0 + LANE_H * i as f64;
        let base = y0 + LANE_H - 20.0;
        let plot_h = LANE_H - 35.0;
        let top = lane.top();
        let y_of = |v: f64| base - (v / top).clamp(0.0, 1.0) * plot_h;
        let _ = writeln!(
            o,
            r##"<g class="lane"><text x="10" y="{}" font-weight="bold">{}</text><line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##,
            y0 + 20.0,
            esc(&lane.name),
            LEFT + PLOT_W
        );
        if !lane.unit.is_empty() && (!lane.series.is_empty() || !lane.levels.is_empty()) {
            let _ = writeln!(
                o,
                r##"<text x="10" y="{}" fill="#666">0 .. {}</text>"##,
                y0 + 38.0,
                esc(&format_value(top, &lane.unit))
            );
        }
        for (k, level) in lane.levels.iter().enumerate() {
            let y = y_of(level.value);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{}" stroke-dasharray="6,4"><title>{}: {}</title></line><text x="{}" y="{:.1}" fill="#444" text-anchor="end">{}</text>"##,
                LEFT + PLOT_W,
                if k == 0 { "#d62728" } else { "#7f7f7f" },
                esc(&level.name),
                esc(&format_value(level.value, &lane.unit)),
                LEFT + PLOT_W,
                y - 3.0,
                esc(&level.name),
            );
        }
        for (k, series) in lane.series.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            let points: Vec<String> = series
                .points
                .iter()
                .map(|&(ms, v)| format!("{:.1},{:.1}", x_of(ms), y_of(v)))
                .collect();
            let peak = series.points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"><title>{} (peak {})</title></polyline><rect x="{}" y="{}" width="10" height="3" fill="{colour}"/><text x="{}" y="{}" fill="{colour}">{}</text>"#,
                points.join(" "),
                esc(&series.name),
                esc(&format_value(peak, &lane.unit)),
                10.0,
                y0 + 50.0 + 14.0 * f64::from(u8::try_from(k).unwrap_or(u8::MAX)),
                24.0,
                y0 + 54.0 + 14.0 * f64::from(u8::try_from(k).unwrap_or(u8::MAX)),
                esc(&series.name),
            );
        }
        for e in &lane.events {
            let x = x_of(e.t_ms);
            let _ = writeln!(
                o,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{base}" stroke="{}" stroke-width="2"><title>{:.0} ms: {}</title></line>"#,
                base - plot_h,
                esc(&e.colour),
                e.t_ms,
                esc(&e.label)
            );
        }
        o.push_str("</g>\n");
    }
    let axis_y = 40.0 + LANE_H * rows + 10.0;
    for k in 0..=4 {
        let ms = span * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{axis_y}" text-anchor="middle" fill="#444">{:.1} s</text>"##,
            x_of(ms),
            ms / 1000.0
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline() -> Timeline {
        Timeline {
            start_unix_ns: 0,
            duration_ms: 10_000.0,
            lanes: vec![
                Lane {
                    name: "memory-stress".into(),
                    unit: "bytes".into(),
                    series: vec![Series {
                        name: "workers <held>".into(),
                        points: vec![(0.0, 0.0), (5000.0, 512.0 * 1024.0 * 1024.0)],
                    }],
                    levels: vec![Level {
                        name: "asked".into(),
                        value: 512.0 * 1024.0 * 1024.0,
                    }],
                    events: Vec::new(),
                },
                Lane {
                    name: "signals".into(),
                    unit: String::new(),
                    series: Vec::new(),
                    levels: Vec::new(),
                    events: vec![Event {
                        t_ms: 2500.0,
                        label: "SIGKILL to stress (9)".into(),
                        colour: "#d62728".into(),
                    }],
                },
            ],
        }
    }

    #[test]
    fn lanes_share_one_axis() {
        let s = svg(&timeline(), "a & b");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches(r#"<g class="lane">"#).count(), 2);
        assert!(s.contains("a &amp; b") && s.contains("workers &lt;held&gt;"));
        // The series ends at the middle of the plot, at the asked level's height; the event
        // sits a quarter of the way along.
        assert!(s.contains(&format!("{:.1},", LEFT + PLOT_W / 2.0)), "{s}");
        assert!(
            s.contains(&format!(r#"x1="{:.1}""#, LEFT + PLOT_W / 4.0)),
            "{s}"
        );
        assert!(s.contains("asked: 512.0 MiB"), "{s}");
        assert!(s.contains("2500 ms: SIGKILL to stress (9)"), "{s}");
    }

    #[test]
    fn totals_become_rates() {
        let r = rate_per_second(&[(250.0, 25), (500.0, 50), (500.0, 60), (1000.0, 60)]);
        assert_eq!(r, vec![(250.0, 100.0), (500.0, 100.0), (1000.0, 0.0)]);
    }

    #[test]
    fn values_read_in_their_unit() {
        assert_eq!(format_value(1536.0, "bytes"), "1.5 KiB");
        assert_eq!(format_value(0.5, "CPUs"), "0.50 CPUs");
        assert_eq!(format_value(42.25, "percent"), "42.2%");
        assert_eq!(format_value(99.0, "samples/s"), "99 samples/s");
        // An empty lane still gets a positive scale.
        assert!((Lane::default().top() - 1.0).abs() < f64::EPSILON);
    }
}

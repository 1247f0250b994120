//! Flamegraph SVG through inferno (the Rust port of flamegraph.pl).

use super::{Profile, folded};

/// A flamegraph of sample type `index`; `count_name` names its unit in tooltips ("samples",
/// "bytes").
pub fn encode(
    profile: &Profile,
    index: usize,
    title: &str,
    subtitle: &str,
    count_name: &str,
) -> std::io::Result<Vec<u8>> {
    let lines: Vec<String> = folded::lines(profile, index)
        .into_iter()
        .map(|(l, c)| format!("{l} {c}"))
        .collect();
    toe_report::folded::flamegraph_of_lines(
        &lines,
        &toe_report::folded::Graph {
            title,
            subtitle,
            count_name,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::{super::fixtures, *};

    #[test]
    fn empty_profile_says_so() {
        let svg = encode(&Profile::default(), 0, "t", "0 bytes", "bytes").unwrap();
        assert!(
            String::from_utf8(svg)
                .unwrap()
                .contains("nothing was recorded")
        );
    }

    #[test]
    fn svg_names_frames_and_total() {
        let svg = String::from_utf8(
            encode(&fixtures::profile(), 0, "t", "100 samples", "samples").unwrap(),
        )
        .unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("hot (70 samples"), "hot frame missing");
        assert!(svg.contains("all (100 samples"), "total missing");
    }
}

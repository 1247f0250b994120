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
    let mut opts = inferno::flamegraph::Options::default();
    title.clone_into(&mut opts.title);
    opts.count_name = count_name.into();
    opts.subtitle = Some(format!("{subtitle}; _[k] kernel, _[i] inlined"));
    let lines: Vec<String> = folded::lines(profile, index)
        .into_iter()
        .map(|(l, c)| format!("{l} {c}"))
        .collect();
    let mut out = Vec::new();
    if lines.is_empty() {
        // inferno refuses input without counts; a plain page says "nothing recorded" honestly
        // instead of a fake frame.
        out.extend_from_slice(toe_report::folded::empty_svg(title, subtitle).as_bytes());
        return Ok(out);
    }
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)?;
    Ok(out)
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

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
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let page = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"960\" height=\"120\" font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"480\" y=\"40\" text-anchor=\"middle\" font-size=\"17\">{}</text><text x=\"480\" y=\"80\" text-anchor=\"middle\" font-size=\"13\">{}: nothing was recorded</text></svg>\n",
            esc(title),
            esc(subtitle)
        );
        out.extend_from_slice(page.as_bytes());
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

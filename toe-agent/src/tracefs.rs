//! Tracepoint formats from tracefs. Programs read tracepoint records at fixed offsets; checking
//! those offsets against the running kernel's `format` files turns a layout change into a clear
//! refusal at start instead of wrong events.

use std::{fs, path::PathBuf};

const ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn format_path(category: &str, event: &str) -> Option<PathBuf> {
    ROOTS
        .iter()
        .map(|r| {
            PathBuf::from(r)
                .join("events")
                .join(category)
                .join(event)
                .join("format")
        })
        .find(|p| p.is_file())
}

/// `(offset, size)` of `field` in a format file's text.
#[must_use]
pub fn field_in(format: &str, field: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // The name is the last word of the declaration, without any array suffix.
        let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
        if name != field {
            return None;
        }
        let num = |key: &str| -> Option<usize> {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        Some((num("offset:")?, num("size:")?))
    })
}

/// Checks every (category, event, field, offset, size); the error names each mismatch.
pub fn check_fields(fields: &[(&str, &str, &str, usize, usize)]) -> Result<(), String> {
    let mut problems = Vec::new();
    for &(category, event, field, offset, size) in fields {
        let Some(path) = format_path(category, event) else {
            problems.push(format!(
                "tracepoint {category}:{event} is missing (is tracefs mounted? `mount -t tracefs tracefs /sys/kernel/tracing`)"
            ));
            continue;
        };
        match field_at(&path, (category, event, field, offset, size)) {
            Ok(true) => {}
            Ok(false) => problems.push(format!("{category}:{event} has no field {field}")),
            Err(e) => problems.push(e),
        }
    }
    problems.dedup();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Whether a field some kernels lack is there, at the expected place; an error when the
/// tracepoint is missing or the field is elsewhere.
pub fn has_field(field: (&str, &str, &str, usize, usize)) -> Result<bool, String> {
    let (category, event, ..) = field;
    let path = format_path(category, event)
        .ok_or_else(|| format!("tracepoint {category}:{event} is missing"))?;
    field_at(&path, field)
}

fn field_at(
    path: &std::path::Path,
    (category, event, field, offset, size): (&str, &str, &str, usize, usize),
) -> Result<bool, String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    match field_in(&text, field) {
        Some(found) if found == (offset, size) => Ok(true),
        Some((o, s)) => Err(format!(
            "{category}:{event} field {field} is at offset {o} size {s}, expected {offset}/{size}"
        )),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::field_in;

    const FORMAT: &str = "name: signal_generate\nID: 200\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;\n\
        \tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";

    #[test]
    fn fields_are_found_by_name() {
        assert_eq!(field_in(FORMAT, "sig"), Some((8, 4)));
        assert_eq!(field_in(FORMAT, "comm"), Some((20, 16)));
        assert_eq!(field_in(FORMAT, "filename"), Some((8, 4)));
        assert_eq!(field_in(FORMAT, "pid"), None);
    }
}

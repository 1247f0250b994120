//! Typed tool arguments. A tool declares a schema; `commandLineArguments` from a spec are parsed
//! against it into typed values. Nothing is ever handed to a shell, and anything the schema does
//! not name is rejected rather than passed through.

use std::{collections::BTreeMap, time::Duration};

use super::duration::parse_duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgKind {
    Integer {
        min: i64,
        max: i64,
    },
    Bool,
    Duration {
        min: Duration,
        max: Duration,
    },
    Enum(&'static [&'static str]),
    /// Bytes, written as a number with an optional unit (`4096`, `64KiB`, `512Ki`, `1MB`).
    Size {
        min: u64,
        max: u64,
    },
    /// Bytes (as [`ArgKind::Size`]) or a percentage of some limit (`50%`).
    Amount {
        max_bytes: u64,
        max_percent: u32,
    },
    /// An absolute path without `..` components or control characters, at most `max_len` bytes.
    Path {
        max_len: usize,
    },
    /// Comma-separated signal names or numbers (`TERM,KILL,USR1`, `all`).
    Signals,
    /// Comma-separated names (process names, container names): each at most `max_len` bytes of
    /// letters, digits and `._-:@+`, at most `max_count` of them. No shell or path syntax can
    /// get through.
    Names {
        max_count: usize,
        max_len: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// Without the leading `--`.
    pub name: &'static str,
    pub kind: ArgKind,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgValue {
    Integer(i64),
    Bool(bool),
    Duration(Duration),
    Enum(&'static str),
    Size(u64),
    Amount(Amount),
    Path(String),
    /// Bit `n - 1` set for signal `n`.
    Signals(u64),
    Names(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}")]
pub struct ArgError {
    what: String,
}

impl ArgError {
    pub(super) fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}

/// A quantity given absolutely or relative to a limit the target has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Bytes(u64),
    /// Whole percent, 1..=max.
    Percent(u32),
}

/// Arguments after parsing, defaults filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedArgs(BTreeMap<&'static str, ArgValue>);

impl std::fmt::Display for ArgValue {
    /// The value as an argument takes it (`--name=<this>`), so what is shown can be given back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Integer(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
            Self::Duration(d) => f.write_str(&super::format_duration(*d)),
            Self::Enum(s) => f.write_str(s),
            Self::Size(b) | Self::Amount(Amount::Bytes(b)) => f.write_str(&format_size(*b)),
            Self::Amount(Amount::Percent(p)) => write!(f, "{p}%"),
            Self::Path(p) => f.write_str(p),
            Self::Signals(u64::MAX) => f.write_str("all"),
            Self::Signals(mask) => {
                let names: Vec<String> = (1..=64)
                    .filter(|n| mask & (1u64 << (n - 1)) != 0)
                    .map(|n| {
                        crate::signals::signal_name(n)
                            .trim_start_matches("SIG")
                            .to_owned()
                    })
                    .collect();
                f.write_str(&names.join(","))
            }
            Self::Names(v) => f.write_str(&v.join(",")),
        }
    }
}

impl ParsedArgs {
    /// Every argument as `--name=value`, defaults included, in the schema's words.
    #[must_use]
    pub fn describe(&self) -> Vec<String> {
        self.0
            .iter()
            // An empty list is the argument left unset ("any").
            .filter(|(_, v)| !matches!(v, ArgValue::Names(n) if n.is_empty()))
            .map(|(k, v)| format!("--{k}={v}"))
            .collect()
    }

    /// # Panics
    /// If `name` is not an integer argument of the schema: a bug in the tool definition.
    #[must_use]
    pub fn integer(&self, name: &str) -> i64 {
        match self.0.get(name) {
            Some(ArgValue::Integer(v)) => *v,
            other => panic!("schema has no integer argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a boolean argument of the schema: a bug in the tool definition.
    #[must_use]
    pub fn bool(&self, name: &str) -> bool {
        match self.0.get(name) {
            Some(ArgValue::Bool(v)) => *v,
            other => panic!("schema has no bool argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a size argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn size(&self, name: &str) -> u64 {
        match self.0.get(name) {
            Some(ArgValue::Size(v)) => *v,
            other => panic!("schema has no size argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a duration argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn duration(&self, name: &str) -> Duration {
        match self.0.get(name) {
            Some(ArgValue::Duration(v)) => *v,
            other => panic!("schema has no duration argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not an enum argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn choice(&self, name: &str) -> &'static str {
        match self.0.get(name) {
            Some(ArgValue::Enum(v)) => v,
            other => panic!("schema has no enum argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not an amount argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn amount(&self, name: &str) -> Amount {
        match self.0.get(name) {
            Some(ArgValue::Amount(v)) => *v,
            other => panic!("schema has no amount argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a path argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn path(&self, name: &str) -> &str {
        match self.0.get(name) {
            Some(ArgValue::Path(v)) => v,
            other => panic!("schema has no path argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a signal-set argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn signals(&self, name: &str) -> u64 {
        match self.0.get(name) {
            Some(ArgValue::Signals(v)) => *v,
            other => panic!("schema has no signals argument {name}: {other:?}"),
        }
    }

    /// # Panics
    /// If `name` is not a names argument with a default: a bug in the tool definition.
    #[must_use]
    pub fn names(&self, name: &str) -> &[String] {
        match self.0.get(name) {
            Some(ArgValue::Names(v)) => v,
            other => panic!("schema has no names argument {name}: {other:?}"),
        }
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<&ArgValue> {
        self.0.get(name)
    }
}

/// Units a size may carry: IEC binary (`KiB`, and Kubernetes' `Ki`), SI decimal (`kB`, `K`).
const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("Ki", 1 << 10),
    ("MiB", 1 << 20),
    ("Mi", 1 << 20),
    ("GiB", 1 << 30),
    ("Gi", 1 << 30),
    ("TiB", 1 << 40),
    ("Ti", 1 << 40),
    ("kB", 1000),
    ("KB", 1000),
    ("k", 1000),
    ("K", 1000),
    ("MB", 1_000_000),
    ("M", 1_000_000),
    ("GB", 1_000_000_000),
    ("G", 1_000_000_000),
];

/// Parses a byte size: digits, then an optional unit from [`SIZE_UNITS`].
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    if t.starts_with('-') {
        return Err(format!("{raw} is not a size: sizes cannot be negative"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "\"{raw}\" is not a size (expected bytes, e.g. 4096, 64KiB, 1MB)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{raw} is too large for a size"))?;
    let unit = unit.trim();
    let mult = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!(
                    "\"{raw}\": unknown size unit \"{unit}\" (use B, KiB, MiB, GiB, kB, MB, GB)"
                )
            })?
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{raw} is too large for a size"))
}

pub use crate::format_size;

/// `all`, or comma-separated signals (see [`crate::signals::parse_signal`]) as a bit mask.
pub fn parse_signal_set(raw: &str) -> Result<u64, String> {
    if raw.trim().eq_ignore_ascii_case("all") {
        return Ok(u64::MAX);
    }
    let mut mask = 0u64;
    for part in raw.split(',') {
        let sig = crate::signals::parse_signal(part)?;
        mask |= 1 << (sig - 1);
    }
    Ok(mask)
}

/// Comma-separated names, empty list allowed (`""`).
pub fn parse_names(raw: &str, max_count: usize, max_len: usize) -> Result<Vec<String>, String> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = raw.split(',').map(str::to_owned).collect();
    if names.len() > max_count {
        return Err(format!(
            "{} names given, at most {max_count} allowed",
            names.len()
        ));
    }
    for n in &names {
        if n.is_empty() || n.len() > max_len {
            return Err(format!("\"{n}\" must be 1..={max_len} bytes long"));
        }
        if let Some(c) = n
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-:@+".contains(*c)))
        {
            return Err(format!(
                "\"{n}\" contains {c:?}; names may use letters, digits and ._-:@+ only"
            ));
        }
    }
    Ok(names)
}

pub(super) fn parse_amount(
    name: &str,
    raw: &str,
    max_bytes: u64,
    max_percent: u32,
) -> Result<ArgValue, ArgError> {
    if let Some(p) = raw.trim().strip_suffix('%') {
        let v: u32 = p
            .trim()
            .parse()
            .map_err(|_| ArgError::new(format!("--{name}: \"{raw}\" is not a whole percentage")))?;
        if v == 0 || v > max_percent {
            return Err(ArgError::new(format!(
                "--{name}: {raw} is out of range 1%..={max_percent}%"
            )));
        }
        return Ok(ArgValue::Amount(Amount::Percent(v)));
    }
    let v = parse_size(raw)
        .map_err(|e| ArgError::new(format!("--{name}: {e} (or a percentage, e.g. 50%)")))?;
    if v == 0 || v > max_bytes {
        return Err(ArgError::new(format!(
            "--{name}: {raw} is out of range 1B..={}",
            format_size(max_bytes)
        )));
    }
    Ok(ArgValue::Amount(Amount::Bytes(v)))
}

pub(super) fn parse_path(name: &str, raw: &str, max_len: usize) -> Result<ArgValue, ArgError> {
    let bad = if !raw.starts_with('/') {
        Some("must be absolute")
    } else if raw.split('/').any(|c| c == "..") {
        Some("\"..\" is not allowed")
    } else if raw.chars().any(char::is_control) {
        Some("control characters are not allowed")
    } else if raw
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || "/._-+@:=,%".contains(c)))
    {
        // Nothing TOE runs goes through a shell, but a path that looks like shell syntax is
        // refused anyway: it is never what a user meant, and tools run as ephemeral containers
        // may hand it to one.
        Some("only letters, digits and /._-+@:=,% are allowed")
    } else if raw.len() > max_len {
        Some("too long")
    } else {
        None
    };
    match bad {
        Some(why) => Err(ArgError::new(format!("--{name}: {raw:?}: {why}"))),
        None => Ok(ArgValue::Path(raw.to_owned())),
    }
}

fn parse_value(spec: &ArgSpec, raw: &str) -> Result<ArgValue, ArgError> {
    let name = spec.name;
    match &spec.kind {
        ArgKind::Integer { min, max } => {
            let v: i64 = raw
                .parse()
                .map_err(|_| ArgError::new(format!("--{name}: \"{raw}\" is not an integer")))?;
            if v < *min || v > *max {
                return Err(ArgError::new(format!(
                    "--{name}: {v} is out of range {min}..={max}"
                )));
            }
            Ok(ArgValue::Integer(v))
        }
        ArgKind::Bool => match raw {
            "true" => Ok(ArgValue::Bool(true)),
            "false" => Ok(ArgValue::Bool(false)),
            _ => Err(ArgError::new(format!(
                "--{name}: \"{raw}\" is not true or false"
            ))),
        },
        ArgKind::Duration { min, max } => {
            let d = parse_duration(raw).map_err(|e| ArgError::new(format!("--{name}: {e}")))?;
            if d < *min || d > *max {
                return Err(ArgError::new(format!(
                    "--{name}: {raw} is out of range {}..={}",
                    super::format_duration(*min),
                    super::format_duration(*max)
                )));
            }
            Ok(ArgValue::Duration(d))
        }
        ArgKind::Size { min, max } => {
            let v = parse_size(raw).map_err(|e| ArgError::new(format!("--{name}: {e}")))?;
            if v < *min || v > *max {
                return Err(ArgError::new(format!(
                    "--{name}: {raw} is out of range {}..={}",
                    format_size(*min),
                    format_size(*max)
                )));
            }
            Ok(ArgValue::Size(v))
        }
        ArgKind::Amount {
            max_bytes,
            max_percent,
        } => parse_amount(name, raw, *max_bytes, *max_percent),
        ArgKind::Path { max_len } => parse_path(name, raw, *max_len),
        ArgKind::Signals => parse_signal_set(raw)
            .map(ArgValue::Signals)
            .map_err(|e| ArgError::new(format!("--{name}: {e}"))),
        ArgKind::Names { max_count, max_len } => parse_names(raw, *max_count, *max_len)
            .map(ArgValue::Names)
            .map_err(|e| ArgError::new(format!("--{name}: {e}"))),
        ArgKind::Enum(values) => values
            .iter()
            .find(|v| **v == raw)
            .map(|v| ArgValue::Enum(v))
            .ok_or_else(|| {
                ArgError::new(format!(
                    "--{name}: \"{raw}\" is not one of {}",
                    values.join(", ")
                ))
            }),
    }
}

/// Parses `args` against `schema`. Accepts `--name=value`, `--name value` and, for booleans,
/// a bare `--name`. Repeating an argument is an error: a silent last-one-wins hides mistakes.
pub fn parse(schema: &[ArgSpec], args: &[String]) -> Result<ParsedArgs, ArgError> {
    parse_with_defaults(schema, args, &BTreeMap::new())
}

/// [`parse`], with `defaults` (argument name -> value text) replacing the schema's own.
pub fn parse_with_defaults(
    schema: &[ArgSpec],
    args: &[String],
    defaults: &BTreeMap<String, String>,
) -> Result<ParsedArgs, ArgError> {
    let mut out = BTreeMap::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ArgError::new(format!(
                "\"{arg}\" is not an argument (expected --name=value)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let spec = schema.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<String> = schema.iter().map(|s| format!("--{}", s.name)).collect();
            ArgError::new(format!(
                "unknown argument --{name} (allowed: {})",
                known.join(", ")
            ))
        })?;
        let raw = match (inline, &spec.kind) {
            (Some(v), _) => v,
            (None, ArgKind::Bool) => "true",
            (None, _) => iter
                .next()
                .map(String::as_str)
                .ok_or_else(|| ArgError::new(format!("--{name}: missing value")))?,
        };
        let value = parse_value(spec, raw)?;
        if out.insert(spec.name, value).is_some() {
            return Err(ArgError::new(format!("--{name}: given more than once")));
        }
    }
    for spec in schema {
        if !out.contains_key(spec.name)
            && let Some(default) = defaults.get(spec.name).map(String::as_str).or(spec.default)
        {
            out.insert(spec.name, parse_value(spec, default)?);
        }
    }
    Ok(ParsedArgs(out))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Hostile argument lists never panic the parser.
        #[test]
        fn hostile_argument_lists_never_panic(
            args in proptest::collection::vec(
                prop_oneof!["\\PC{0,40}", "--[a-z-]{1,14}(=\\PC{0,40})?"],
                0..6,
            )
        ) {
            for def in crate::api::catalogue() {
                let _ = parse(def.args, &args);
            }
        }

        /// A hostile value for any argument of any built-in tool is refused, or holds no shell
        /// syntax, no `..` and no control characters.
        #[test]
        fn hostile_values_are_refused_or_harmless(
            tool in 0usize..64,
            arg in 0usize..64,
            value in prop_oneof![
                "\\PC{0,40}",
                "/[a-z/;|&$`'\"()<>*?. \\\\-]{0,30}",
                "[a-z,;|&$ -]{0,30}",
            ],
        ) {
            let defs = crate::api::catalogue();
            let def = &defs[tool % defs.len()];
            let spec = &def.args[arg % def.args.len()];
            let Ok(parsed) = parse(def.args, &[format!("--{}={value}", spec.name)]) else {
                return Ok(());
            };
            match parsed.get(spec.name) {
                Some(ArgValue::Path(p)) => {
                    prop_assert!(p.starts_with('/'));
                    prop_assert!(!p.split('/').any(|c| c == ".."), "{p}");
                    prop_assert!(
                        p.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+@:=,%".contains(c)),
                        "{p}"
                    );
                }
                Some(ArgValue::Names(names)) => {
                    for n in names {
                        prop_assert!(
                            n.chars().all(|c| c.is_ascii_alphanumeric() || "._-:@+".contains(c)),
                            "{n}"
                        );
                    }
                }
                _ => {}
            }
        }

        /// An integer is accepted exactly when it is in the schema's range.
        #[test]
        fn integers_are_accepted_exactly_within_range(v in -100i64..100) {
            let accepted = p(&[&format!("--n={v}")]).is_ok();
            prop_assert_eq!(accepted, (1..=10).contains(&v));
        }
    }

    const SCHEMA: &[ArgSpec] = &[
        ArgSpec {
            name: "n",
            kind: ArgKind::Integer { min: 1, max: 10 },
            default: Some("5"),
            help: "",
        },
        ArgSpec {
            name: "on",
            kind: ArgKind::Bool,
            default: Some("false"),
            help: "",
        },
        ArgSpec {
            name: "mode",
            kind: ArgKind::Enum(&["a", "b"]),
            default: None,
            help: "",
        },
        ArgSpec {
            name: "wait",
            kind: ArgKind::Duration {
                min: Duration::from_secs(1),
                max: Duration::from_mins(1),
            },
            default: None,
            help: "",
        },
        ArgSpec {
            name: "bytes",
            kind: ArgKind::Size {
                min: 0,
                max: 1 << 30,
            },
            default: Some("64KiB"),
            help: "",
        },
    ];

    fn p(args: &[&str]) -> Result<ParsedArgs, ArgError> {
        parse(
            SCHEMA,
            &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn forms_and_defaults() {
        let a = p(&["--n", "7", "--on", "--mode=b", "--wait=2s"]).unwrap();
        assert_eq!(a.integer("n"), 7);
        assert!(a.bool("on"));
        assert_eq!(a.get("mode"), Some(&ArgValue::Enum("b")));
        assert_eq!(
            a.get("wait"),
            Some(&ArgValue::Duration(Duration::from_secs(2)))
        );
        assert_eq!(p(&["--bytes=1MB"]).unwrap().size("bytes"), 1_000_000);
        assert_eq!(p(&["--bytes", "512Ki"]).unwrap().size("bytes"), 512 << 10);
        let d = p(&[]).unwrap();
        assert_eq!(d.size("bytes"), 64 << 10);
        assert_eq!(d.integer("n"), 5);
        assert!(!d.bool("on"));
        assert_eq!(d.get("mode"), None);
    }

    #[test]
    fn rejections() {
        for (args, want) in [
            (&["--n=0"][..], "out of range"),
            (&["--n"], "missing value"),
            (&["--n=1", "--n=2"], "more than once"),
            (&["--mode=c"], "not one of a, b"),
            (&["--on=yes"], "not true or false"),
            (&["--wait=2m"], "out of range"),
            (&["n=1"], "is not an argument"),
            (&["--n=1;rm -rf /"], "not an integer"),
            (&["--x"], "unknown argument --x"),
            (&["--bytes=-1"], "sizes cannot be negative"),
            (&["--bytes=1XB"], "unknown size unit"),
            (&["--bytes=2GiB"], "out of range 0B..=1GiB"),
            (&["--bytes=KiB"], "is not a size"),
        ] {
            let e = p(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}

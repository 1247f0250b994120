//! Image-based tools: a PowerToolConfig with engine `ephemeralContainer` is the whole schema.
//! Every argument is parsed into a typed value by its rule and checked against the rule's
//! bounds; the container gets `--name=value` items (never a shell command line).

use std::time::Duration;

use super::{
    ToolSpec, ValidatedTool,
    args::{
        ArgError, ArgValue, parse_amount, parse_names, parse_path, parse_signal_set, parse_size,
    },
    config::{CheckedConfig, CheckedRule, RuleType},
    duration::{format_duration, parse_duration},
    tools::{ImageOptions, ToolOptions},
};

/// Without a pattern, a `string` argument may use only these (a conservative set that no
/// shell, path or option syntax gets through).
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._-:@+=,".contains(c)
}

/// `raw` as the typed value `rule` describes.
fn parse(rule: &CheckedRule, raw: &str) -> Result<ArgValue, String> {
    let name = &rule.rule.name;
    let err = |e: String| format!("--{name}: {e}");
    let max_len = rule.rule.max_length.unwrap_or(256);
    Ok(match rule.rule.kind {
        RuleType::Integer => ArgValue::Integer(
            raw.parse()
                .map_err(|_| err(format!("\"{raw}\" is not an integer")))?,
        ),
        RuleType::Boolean => match raw {
            "true" => ArgValue::Bool(true),
            "false" => ArgValue::Bool(false),
            _ => return Err(err(format!("\"{raw}\" is not true or false"))),
        },
        RuleType::Duration => ArgValue::Duration(parse_duration(raw).map_err(err)?),
        RuleType::Size => ArgValue::Size(parse_size(raw).map_err(err)?),
        RuleType::Percentage | RuleType::Amount => {
            if rule.rule.kind == RuleType::Percentage && !raw.trim().ends_with('%') {
                return Err(err(format!("\"{raw}\" is not a percentage (e.g. 50%)")));
            }
            parse_amount(name, raw, u64::MAX, 100).map_err(|e: ArgError| e.to_string())?
        }
        RuleType::Enum => {
            if !rule.rule.values.iter().any(|v| v == raw) {
                return Err(err(format!(
                    "\"{raw}\" is not one of {}",
                    rule.rule.values.join(", ")
                )));
            }
            // Enum values of image tools are the config's own strings.
            ArgValue::Names(vec![raw.to_owned()])
        }
        RuleType::Path => parse_path(name, raw, max_len).map_err(|e| e.to_string())?,
        RuleType::String => {
            if raw.len() > max_len {
                return Err(err(format!("longer than {max_len} bytes")));
            }
            if rule.rule.pattern.is_none() && !raw.chars().all(plain) {
                return Err(err(format!(
                    "\"{raw}\": without a pattern in the config, only letters, digits and \
                     ._-:@+=, are allowed"
                )));
            }
            if raw.chars().any(char::is_control) {
                return Err(err("control characters are not allowed".into()));
            }
            ArgValue::Names(vec![raw.to_owned()])
        }
        RuleType::Signals => ArgValue::Signals(parse_signal_set(raw).map_err(err)?),
        RuleType::Names => ArgValue::Names(parse_names(raw, 16, max_len).map_err(err)?),
    })
}

/// A rule's default must pass the rule itself.
pub(super) fn check_default(rule: &CheckedRule) -> Result<(), String> {
    let Some(default) = &rule.rule.default else {
        return Ok(());
    };
    let value = parse(rule, &default.to_string())?;
    rule.admits(&value)
}

/// Splits `args` into (name, value text) pairs: `--name=value`, `--name value`, and a bare
/// `--name` for a boolean.
fn pairs<'a>(
    config: &'a CheckedConfig,
    args: &'a [String],
) -> Result<Vec<(&'a CheckedRule, String)>, String> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let body = arg
            .strip_prefix("--")
            .ok_or_else(|| format!("\"{arg}\" is not an argument (expected --name=value)"))?;
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let rule = config
            .rule(name)
            .ok_or_else(|| format!("--{name} is not allowed by PowerToolConfig {}", config.name))?;
        let raw = match (inline, rule.rule.kind) {
            (Some(v), _) => v,
            (None, RuleType::Boolean) => "true".to_owned(),
            (None, _) => iter
                .next()
                .cloned()
                .ok_or_else(|| format!("--{name}: missing value"))?,
        };
        out.push((rule, raw));
    }
    Ok(out)
}

/// Validates an image tool's spec against its config.
pub(super) fn validate(
    spec: &ToolSpec,
    config: &CheckedConfig,
    run_duration: Option<Duration>,
) -> Result<ValidatedTool, (bool, String)> {
    // (true, why): a duration error; (false, why): an argument error.
    let duration = match (&spec.duration, run_duration) {
        (Some(_), Some(_)) => {
            return Err((
                true,
                "a tool alongside runs for the whole run (spec.tool.duration); remove this".into(),
            ));
        }
        (None, Some(d)) => d,
        (None, None) => config.max_duration.min(Duration::from_mins(5)),
        (Some(t), None) => parse_duration(t).map_err(|e| (true, e))?,
    };
    if duration.is_zero() || duration > config.max_duration {
        return Err((
            true,
            format!(
                "{} must be in (0s, {}] for PowerToolConfig {}",
                format_duration(duration),
                format_duration(config.max_duration),
                config.name
            ),
        ));
    }
    let given = pairs(config, &spec.command_line_arguments).map_err(|e| (false, e))?;
    let mut argv = Vec::new();
    for (i, (rule, raw)) in given.iter().enumerate() {
        if !rule.rule.repeated
            && given[..i]
                .iter()
                .any(|(r, _)| r.rule.name == rule.rule.name)
        {
            return Err((false, format!("--{}: given more than once", rule.rule.name)));
        }
        let value = parse(rule, raw).map_err(|e| (false, e))?;
        rule.admits(&value).map_err(|why| {
            (
                false,
                format!(
                    "--{}: {why} (rule of PowerToolConfig {})",
                    rule.rule.name, config.name
                ),
            )
        })?;
        argv.push(format!("--{}={raw}", rule.rule.name));
    }
    for rule in &config.rules {
        if let Some(default) = &rule.rule.default
            && !given.iter().any(|(r, _)| r.rule.name == rule.rule.name)
        {
            argv.push(format!("--{}={default}", rule.rule.name));
        }
    }
    Ok(ValidatedTool {
        name: config.spec.tool.clone(),
        duration,
        arguments: argv.clone(),
        options: ToolOptions::Image(ImageOptions {
            image: config.spec.image.clone().unwrap_or_default(),
            argv,
        }),
    })
}

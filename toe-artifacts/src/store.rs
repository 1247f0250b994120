//! Object stores: opening one from a URL (credentials from the environment), directory URLs,
//! and the timestamps that name run and report directories.

use std::time::SystemTime;

use object_store::{ObjectStore, path::Path as StorePath};
use url::Url;

/// Credentials and settings for cloud stores come from the environment, the way each provider's
/// own tools read them (AWS_*, GOOGLE_*, AZURE_*).
#[must_use]
pub fn env_options() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// A store URL that does not open.
#[derive(Debug, thiserror::Error)]
#[error("store URL {url}: {source}")]
pub struct OpenError {
    pub url: String,
    #[source]
    pub source: object_store::Error,
}

/// A store and the path a URL points at within it.
pub fn open(url: &Url) -> Result<(Box<dyn ObjectStore>, StorePath), OpenError> {
    object_store::parse_url_opts(url, env_options()).map_err(|source| OpenError {
        url: url.to_string(),
        source,
    })
}

/// One line saying why a store operation failed, for the person reading it. object_store's errors
/// repeat their sources inside their own messages (a failed PUT's chain names the same request
/// four times), so this names the kind of failure once, then the innermost cause. S3's error codes
/// (`<Code>` in the XML body) are a documented, stable part of its API, which is why they are
/// matched here by name.
#[must_use]
pub fn explain(e: &object_store::Error) -> String {
    let mut innermost: &dyn std::error::Error = e;
    let mut connect = false;
    loop {
        if let Some(io) = innermost.downcast_ref::<std::io::Error>() {
            connect |= matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            );
        }
        match innermost.source() {
            Some(s) => innermost = s,
            None => break,
        }
    }
    let text = e.to_string();
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find("</")?;
        Some(text[start..start + len].to_owned())
    };
    let code = tag("Code");
    let kind = match code.as_deref() {
        Some(
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "ExpiredToken"
            | "InvalidToken"
            | "InvalidSecurity",
        ) => "the store refused the credentials",
        Some("NoSuchBucket") => "the bucket does not exist",
        _ if matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) =>
        {
            "the store refused the credentials"
        }
        _ if connect
            || text.contains("error sending request")
            || text.contains("dns error")
            || text.contains("tcp connect error") =>
        {
            "the store's endpoint cannot be reached"
        }
        _ => "the store failed",
    };
    let cause = match (code, tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => innermost.to_string(),
    };
    format!("{kind} ({})", cause.trim())
}

/// `url` as a directory (a trailing `/`), so that joining a relative name goes below it.
#[must_use]
pub fn as_dir(url: &Url) -> Url {
    let mut u = url.clone();
    if !u.path().ends_with('/') {
        u.set_path(&format!("{}/", u.path()));
    }
    u
}

/// `2026-11-26T10:15:00Z` -> `20261126T101500Z`, sortable and safe in any object store.
#[must_use]
pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// The time a [`stamp`] names.
#[must_use]
pub fn parse_stamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_answer(status: &str, code: &str, message: &str) -> object_store::Error {
        // The shape object_store gives a refused request: the status, then S3's XML error body.
        object_store::Error::Generic {
            store: "S3",
            source: format!(
                "Error performing PUT http://127.0.0.1:9000/b/k: Client error with status \
                 {status}: <?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
                 <Message>{message}</Message><RequestId>1</RequestId></Error>"
            )
            .into(),
        }
    }

    #[test]
    fn store_failures_are_named_in_one_line() {
        let cases = [
            (
                s3_answer(
                    "404 Not Found",
                    "NoSuchBucket",
                    "The specified bucket does not exist",
                ),
                "the bucket does not exist (NoSuchBucket: The specified bucket does not exist)",
            ),
            (
                s3_answer(
                    "403 Forbidden",
                    "InvalidAccessKeyId",
                    "The key does not exist",
                ),
                "the store refused the credentials (InvalidAccessKeyId: The key does not exist)",
            ),
            (
                s3_answer("500 Internal Server Error", "InternalError", "try again"),
                "the store failed (InternalError: try again)",
            ),
            (
                object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                },
                "the store's endpoint cannot be reached (connection refused)",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(explain(&e), want);
        }
    }
}

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

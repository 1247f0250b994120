//! The artifact contract between everything that writes a run's results and everything that
//! reads them: the agent (local and node mode), the operator's image tools, and processing.
//!
//! - [`names`]: every artifact's file name and summary key;
//! - [`layout`]: the one function that turns (output base, PowerTool, run, pod, container) into
//!   a location, and the rules an output URL must follow;
//! - [`summary`]: the `summary.json` schema, written by the agent and read back by processing
//!   (every field has a default, so older and partial summaries still read);
//! - the encoders: [`profile`] (the symbolized profile model), [`pprof`], [`folded`] (folded
//!   stacks and flamegraphs), [`timeline`], [`rss`];
//! - [`store`]: opening object stores and naming timestamped directories.

pub mod folded;
pub mod layout;
pub mod names;
pub mod pprof;
pub mod profile;
pub mod proto;
pub mod rss;
pub mod store;
pub mod summary;
pub mod timeline;

/// Text for SVG and HTML: the characters markup would read as its own escaped.
#[must_use]
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// `n` bytes for people: `512 B`, `1.5 KiB`, `2.0 GiB`.
#[must_use]
pub fn bytes(n: u64) -> String {
    summary::memory::bytes(n)
}

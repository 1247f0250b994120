//! The report server: lists the processed outputs in the object store and serves them, so a
//! Service (and an optional Ingress) in front of the operator makes every report one link away.
//! Read-only; paths are checked segment by segment before they reach the store.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use object_store::{ObjectStore, ObjectStoreExt as _, path::Path as StorePath};
use toe_artifacts::esc;
use toe_report::store;
use url::Url;

/// Where processed outputs live below the store's root, as the processing controller writes them.
pub const REPORTS_DIR: &str = "_reports";

#[derive(Clone)]
pub struct Reports {
    store: Arc<dyn ObjectStore>,
    base: StorePath,
}

impl Reports {
    /// Serves `<artifacts>/_reports/`.
    pub fn new(artifacts: &Url) -> Result<Self, store::StoreError> {
        let (s, root) = toe_artifacts::store::open(artifacts)?;
        Ok(Self {
            store: Arc::from(s),
            base: root.join(REPORTS_DIR),
        })
    }
}

/// `/`, `/reports/` (index) and `/reports/<namespace>/<name>/<stamp or latest>/<file>`.
pub fn router(reports: Reports) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/reports/") }))
        .route("/reports/", get(index))
        .route("/reports/{*path}", get(file))
        .with_state(reports)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("folded" | "txt" | "csv") => "text/plain; charset=utf-8",
        Some("gz") => "application/gzip",
        _ => "application/octet-stream",
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, message.to_owned()).into_response()
}

async fn index(State(r): State<Reports>) -> Response {
    let dirs = match store::list_outputs(r.store.as_ref(), &r.base).await {
        Ok(d) => d,
        Err(e) => {
            return error(StatusCode::BAD_GATEWAY, &format!("listing reports: {e}"));
        }
    };
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>TOE reports</title><style>body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}</style></head><body><h1>TOE reports</h1>",
    );
    if dirs.is_empty() {
        h.push_str(
            "<p>No processed reports yet. A PowerToolProcessing writes one on its schedule.</p>",
        );
    } else {
        h.push_str("<table><tr><th>namespace</th><th>processing</th><th>processed (UTC)</th><th>report</th><th>files</th></tr>");
    }
    for (dir, files) in &dirs {
        let parts: Vec<&str> = dir.split('/').collect();
        let [ns, name, stamp] = parts[..] else {
            continue;
        };
        let report = if files.iter().any(|f| f == "report.html") {
            format!("<a href=\"/reports/{}/report.html\">report</a>", esc(dir))
        } else {
            String::new()
        };
        let list: String =
            files
                .iter()
                .filter(|f| !f.starts_with("runs/"))
                .fold(String::new(), |mut s, f| {
                    let _ = write!(
                        s,
                        "<a href=\"/reports/{}/{}\">{}</a> ",
                        esc(dir),
                        esc(f),
                        esc(f)
                    );
                    s
                });
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{report}</td><td>{list}</td></tr>",
            esc(ns),
            esc(name),
            esc(stamp)
        );
    }
    h.push_str("</table></body></html>");
    Html(h).into_response()
}

/// A path segment a client may name: no traversal, no empty parts, nothing the store would read
/// differently.
fn safe(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

async fn file(State(r): State<Reports>, Path(path): Path<String>) -> Response {
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 4 || !parts.iter().all(|p| safe(p)) {
        return error(
            StatusCode::NOT_FOUND,
            "no such report: use /reports/<namespace>/<processing>/<stamp or latest>/<file>",
        );
    }
    let mut parts: Vec<String> = parts.into_iter().map(str::to_owned).collect();
    if parts[2] == "latest" {
        let dir = r
            .base
            .clone()
            .join(parts[0].as_str())
            .join(parts[1].as_str());
        match store::list_outputs(r.store.as_ref(), &dir).await {
            Ok(d) if !d.is_empty() => d[0].0.clone_into(&mut parts[2]),
            Ok(_) => return error(StatusCode::NOT_FOUND, "no report processed yet"),
            Err(e) => return error(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    }
    let location: StorePath = r
        .base
        .parts()
        .chain(parts.iter().map(|p| p.as_str().into()))
        .collect();
    let got = match r.store.get(&location).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return error(StatusCode::NOT_FOUND, "no such file");
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    match got.bytes().await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, content_type(&path)),
                // Reports embed their own script; nothing else may run or load.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:",
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_segments_pass() {
        assert!(safe("report.html") && safe("20261126T101500Z") && safe("team-a"));
        assert!(!safe("..") && !safe("") && !safe("a%2f") && !safe("a b"));
    }
}

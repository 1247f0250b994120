//! The report server: lists the processed outputs in the object store and serves them, so a
//! Service (and an optional Ingress) in front of the operator makes every report one link away.
//! Read-only; paths are checked segment by segment before they reach the store.
//!
//! Reports name a namespace's processes, functions and failures: a reader authenticates with a
//! Kubernetes bearer token (TokenReview) and sees the reports of the namespaces where they may
//! read PowerToolProcessings (SubjectAccessReview), unless an admin opened the server for a
//! single-tenant cluster.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use object_store::{ObjectStore, ObjectStoreExt as _, path::Path as StorePath};
use toe_artifacts::esc;
use toe_common::api::PowerToolProcessing;
use toe_report::store;
use url::Url;

/// Where processed outputs live below the store's root, as the processing controller writes them.
pub const REPORTS_DIR: &str = "_reports";

/// Who may read reports.
#[derive(Clone)]
pub enum Access {
    /// Anyone who reaches the server: only for a single-tenant cluster, by an admin's choice.
    Open,
    /// Readers with a bearer token the API server authenticates, per namespace as RBAC allows
    /// them to read PowerToolProcessings there.
    Kubernetes(kube::Client),
}

#[derive(Clone)]
pub struct Reports {
    store: Arc<dyn ObjectStore>,
    base: StorePath,
    access: Access,
    artifacts: Url,
    /// The operator's own client, to find processings that write to their own `output.url`.
    processings: Option<kube::Client>,
    /// Stores opened for such processings, by their directory's URL (one per processing).
    opened: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<dyn ObjectStore>>>>,
}

/// Where one processing's report directories are: a store and the processing's directory in it.
type Place = (Arc<dyn ObjectStore>, StorePath);

impl Reports {
    /// Serves `<artifacts>/_reports/` to the readers `access` lets in.
    pub fn new(artifacts: &Url, access: Access) -> Result<Self, store::StoreError> {
        let (s, root) = toe_artifacts::store::open(artifacts)?;
        Ok(Self {
            store: Arc::from(s),
            base: root.join(REPORTS_DIR),
            access,
            artifacts: artifacts.clone(),
            processings: None,
            opened: Arc::default(),
        })
    }

    /// Also serves the reports of processings that write to their own `output.url`: `client`
    /// (the operator's own) reads where each writes from its status, which only the operator
    /// writes.
    #[must_use]
    pub fn with_processings(mut self, client: kube::Client) -> Self {
        self.processings = Some(client);
        self
    }

    /// The directory `<artifacts>/_reports/<namespace>/<name>/`, as the processing controller
    /// names it when a processing has no `output.url`.
    fn default_dir(&self, namespace: &str, name: &str) -> String {
        toe_artifacts::store::as_dir(&self.artifacts)
            .join(&format!("{REPORTS_DIR}/{namespace}/{name}/"))
            .map_or_else(|_| String::new(), |u| u.to_string())
    }

    /// Where `p` writes when it is somewhere else than the default directory.
    fn own_place(&self, p: &PowerToolProcessing) -> Option<Place> {
        let dir = p.status.as_ref()?.output_dir.as_ref()?;
        let (ns, name) = (
            p.metadata.namespace.as_deref()?,
            p.metadata.name.as_deref()?,
        );
        if *dir == self.default_dir(ns, name) {
            return None;
        }
        let url = Url::parse(dir).ok()?;
        let (store, path) = toe_artifacts::store::open(&url).ok()?;
        let mut opened = self
            .opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let store = opened
            .entry(dir.clone())
            .or_insert_with(|| Arc::from(store))
            .clone();
        Some((store, path))
    }

    /// Every processing with its own output place: namespace, name, place.
    async fn own_places(&self) -> Vec<(String, String, Place)> {
        let Some(client) = &self.processings else {
            return Vec::new();
        };
        let Ok(list) = Api::<PowerToolProcessing>::all(client.clone())
            .list(&ListParams::default())
            .await
        else {
            return Vec::new();
        };
        list.items
            .iter()
            .filter_map(|p| {
                let place = self.own_place(p)?;
                Some((
                    p.metadata.namespace.clone()?,
                    p.metadata.name.clone()?,
                    place,
                ))
            })
            .collect()
    }

    /// Where the reports of processing `namespace/name` are.
    async fn place(&self, namespace: &str, name: &str) -> Place {
        if let Some(client) = &self.processings
            && let Ok(Some(p)) = Api::<PowerToolProcessing>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
            && let Some(place) = self.own_place(&p)
        {
            return place;
        }
        (
            self.store.clone(),
            self.base.clone().join(namespace).join(name),
        )
    }
}

/// A reader the API server authenticated.
struct Reader {
    client: kube::Client,
    user: k8s_openapi::api::authentication::v1::UserInfo,
}

/// The reader of a request, or the response that refuses it. `None` with open access.
async fn reader(r: &Reports, headers: &HeaderMap) -> Result<Option<Reader>, Response> {
    let Access::Kubernetes(client) = &r.access else {
        return Ok(None);
    };
    let unauthorized = || {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"toe reports\"")],
            "a Kubernetes bearer token is needed (Authorization: Bearer <token>)".to_owned(),
        )
            .into_response()
    };
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err(unauthorized());
    };
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            ..TokenReviewSpec::default()
        },
        ..TokenReview::default()
    };
    let done = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| error(StatusCode::BAD_GATEWAY, &format!("authenticating: {e}")))?;
    match done.status {
        Some(s) if s.authenticated == Some(true) => Ok(Some(Reader {
            client: client.clone(),
            user: s.user.unwrap_or_default(),
        })),
        _ => Err(unauthorized()),
    }
}

/// Whether `reader` may read the reports of `namespace`: as RBAC lets them get
/// PowerToolProcessings there.
async fn may_read(reader: &Reader, namespace: &str) -> bool {
    let u = &reader.user;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: u.username.clone(),
            groups: u.groups.clone(),
            uid: u.uid.clone(),
            extra: u.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some("get".into()),
                group: Some("toe.run".into()),
                resource: Some("powertoolprocessings".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(reader.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .is_ok_and(|d| d.status.is_some_and(|s| s.allowed))
}

/// The page's CSP: nothing loads or runs but the page's own inline scripts, each pinned by its
/// SHA-256 (a report whose script was changed in the store does not run).
fn csp(body: &[u8], html: bool) -> String {
    let mut hashes = String::new();
    if html {
        let text = String::from_utf8_lossy(body);
        let mut rest = text.as_ref();
        while let Some(start) = rest.find("<script>") {
            let after = &rest[start + "<script>".len()..];
            let Some(end) = after.find("</script>") else {
                break;
            };
            let digest = ring::digest::digest(&ring::digest::SHA256, &after.as_bytes()[..end]);
            let _ = write!(
                hashes,
                " 'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
            );
            rest = &after[end..];
        }
    }
    let scripts = if hashes.is_empty() {
        " 'none'".to_owned()
    } else {
        hashes
    };
    format!("default-src 'none'; script-src{scripts}; style-src 'unsafe-inline'; img-src data:")
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

async fn index(State(r): State<Reports>, headers: HeaderMap) -> Response {
    let reader = match reader(&r, &headers).await {
        Ok(who) => who,
        Err(refused) => return refused,
    };
    let mut dirs = match store::list_outputs(r.store.as_ref(), &r.base).await {
        Ok(d) => d,
        Err(e) => {
            return error(StatusCode::BAD_GATEWAY, &format!("listing reports: {e}"));
        }
    };
    // Processings that write to their own output.url: listed beside the others, served through
    // the same paths.
    let mut unreachable = Vec::new();
    for (ns, name, (s, dir)) in r.own_places().await {
        match store::list_outputs(s.as_ref(), &dir).await {
            Ok(found) => dirs.extend(
                found
                    .into_iter()
                    .map(|(stamp, files)| (format!("{ns}/{name}/{stamp}"), files)),
            ),
            Err(e) => unreachable.push(format!("{ns}/{name}: {e}")),
        }
    }
    dirs.sort_by(|a, b| {
        let stamp = |d: &str| d.rsplit('/').next().unwrap_or_default().to_owned();
        stamp(&b.0).cmp(&stamp(&a.0)).then_with(|| a.0.cmp(&b.0))
    });
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
    let mut readable: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
    for (dir, files) in &dirs {
        let parts: Vec<&str> = dir.split('/').collect();
        let [ns, name, stamp] = parts[..] else {
            continue;
        };
        if let Some(reader) = &reader {
            if !readable.contains_key(ns) {
                readable.insert(ns.to_owned(), may_read(reader, ns).await);
            }
            if readable.get(ns) != Some(&true) {
                continue;
            }
        }
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
    h.push_str("</table>");
    for u in &unreachable {
        let _ = write!(h, "<p>Not listed, its store did not answer: {}</p>", esc(u));
    }
    h.push_str("</body></html>");
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

async fn file(State(r): State<Reports>, headers: HeaderMap, Path(path): Path<String>) -> Response {
    let reader = match reader(&r, &headers).await {
        Ok(who) => who,
        Err(refused) => return refused,
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 4 || !parts.iter().all(|p| safe(p)) {
        return error(
            StatusCode::NOT_FOUND,
            "no such report: use /reports/<namespace>/<processing>/<stamp or latest>/<file>",
        );
    }
    if let Some(reader) = &reader
        && !may_read(reader, parts[0]).await
    {
        return error(
            StatusCode::FORBIDDEN,
            &format!("you may not read reports in namespace {}", parts[0]),
        );
    }
    let mut parts: Vec<String> = parts.into_iter().map(str::to_owned).collect();
    let (store, dir) = r.place(&parts[0], &parts[1]).await;
    if parts[2] == "latest" {
        match store::list_outputs(store.as_ref(), &dir).await {
            Ok(d) if !d.is_empty() => d[0].0.clone_into(&mut parts[2]),
            Ok(_) => return error(StatusCode::NOT_FOUND, "no report processed yet"),
            Err(e) => return error(StatusCode::BAD_GATEWAY, &e.to_string()),
        }
    }
    let location: StorePath = dir
        .parts()
        .chain(parts[2..].iter().map(|p| p.as_str().into()))
        .collect();
    let got = match store.get(&location).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return error(StatusCode::NOT_FOUND, "no such file");
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, &toe_artifacts::store::explain(&e)),
    };
    match got.bytes().await {
        Ok(body) => {
            let kind = content_type(&path);
            let policy = csp(&body, kind.starts_with("text/html"));
            (
                [
                    (header::CONTENT_TYPE, kind.to_owned()),
                    (header::CONTENT_SECURITY_POLICY, policy),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, &toe_artifacts::store::explain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csp_pins_each_inline_script_by_hash() {
        let page = b"<html><script>let a = 1;</script><p>x</p><script>go()</script></html>";
        let p = csp(page, true);
        let sha = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
        };
        assert!(
            p.contains(&format!("'sha256-{}'", sha("let a = 1;"))),
            "{p}"
        );
        assert!(p.contains(&format!("'sha256-{}'", sha("go()"))), "{p}");
        assert!(!p.contains("script-src 'unsafe-inline'"), "{p}");
        assert!(csp(b"<svg/>", false).contains("script-src 'none'"));
    }

    #[test]
    fn only_plain_segments_pass() {
        assert!(safe("report.html") && safe("20261126T101500Z") && safe("team-a"));
        assert!(!safe("..") && !safe("") && !safe("a%2f") && !safe("a b"));
    }
}

//! Where a run's artifacts live. One function per question, used by every writer and reader:
//! the agent in local and node mode, the operator's image tools (which are told where to write)
//! and processing (which reads a PowerTool's runs back).
//!
//! In a cluster: `<base>/<namespace>/<powertool>/<run>/<pod>/<container>/`, where `<base>` is the
//! PowerTool's `spec.output.url`, or else the store the agents were started with, and
//! `<namespace>` the PowerTool's own (every run of a PowerTool is below one directory, which
//! processing reads). A target in another namespace (a `namespaceSelector`) is
//! `<its namespace>_<pod>`: `_` appears in no Kubernetes name, so it cannot collide with a pod
//! of the PowerTool's namespace. Locally: `<base>/<run id>/`.

use std::path::Path;

use url::Url;

use crate::store::as_dir;

/// The store node agents write to when started without `--output`, and the one the operator
/// reads from by default: a directory on each node.
pub const DEFAULT_NODE_STORE: &str = "file:///var/lib/toe/artifacts/";

/// The object store schemes `object_store` opens from a URL.
const SCHEMES: [&str; 11] = [
    "file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
];

/// Why an output location cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("output URL {given:?}: {why}")]
pub struct OutputError {
    pub given: String,
    pub why: String,
}

fn refuse(given: &str, why: impl Into<String>) -> OutputError {
    OutputError {
        given: given.to_owned(),
        why: why.into(),
    }
}

/// An output URL as the directory it names. `given` is an object store URL (`file:///dir`,
/// `s3://bucket/prefix`, `gs://...`, `az://...`) or a path: an absolute path is a directory on the
/// machine (a `file://` store); a relative one resolves against `cwd`, which only local mode has.
pub fn output_base(given: &str, cwd: Option<&Path>) -> Result<Url, OutputError> {
    if given.trim().is_empty() {
        return Err(refuse(given, "empty"));
    }
    if given.contains("://") {
        let url = Url::parse(given).map_err(|e| refuse(given, e.to_string()))?;
        if !SCHEMES.contains(&url.scheme()) {
            return Err(refuse(
                given,
                format!(
                    "unknown scheme {:?}; use file://, s3://, gs:// or az://",
                    url.scheme()
                ),
            ));
        }
        if url.scheme() != "file" && url.host_str().unwrap_or_default().is_empty() {
            return Err(refuse(given, "no bucket or container named"));
        }
        // A location is a path: a `?query` or `#fragment` would be dropped by the stores, so
        // the files would land elsewhere than the URL (and its allowed prefix) says.
        if url.query().is_some() || url.fragment().is_some() {
            return Err(refuse(
                given,
                "it has a ?query or #fragment, which no store location has; write '?' as %3F \
                 and '#' as %23 if the path holds them",
            ));
        }
        return Ok(as_dir(&url));
    }
    let path = Path::new(given);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else if let Some(cwd) = cwd {
        cwd.join(path)
    } else {
        return Err(refuse(
            given,
            "a relative path, which has no meaning on a node (there is no working directory); \
             give an absolute path (a directory on each node) or an object store URL (s3://, \
             gs://, az://)",
        ));
    };
    Url::from_directory_path(&path)
        .map_err(|()| refuse(given, format!("{} is not an absolute path", path.display())))
}

/// The base a PowerTool's artifacts go under in a cluster: its own `spec.output.url`, else the
/// store the agents write to (`default`).
pub fn cluster_base(spec_url: Option<&str>, default: &Url) -> Result<Url, OutputError> {
    match spec_url {
        Some(given) => output_base(given, None),
        None => Ok(as_dir(default)),
    }
}

/// `base` with `parts` appended as path segments, as a directory.
fn below(base: &Url, parts: &[&str]) -> Result<Url, OutputError> {
    let mut url = as_dir(base);
    for p in parts {
        if p.is_empty() || *p == "." || *p == ".." || p.contains('/') {
            return Err(refuse(
                base.as_str(),
                format!("{p:?} cannot be a directory name in it"),
            ));
        }
    }
    {
        let mut segments = url
            .path_segments_mut()
            .map_err(|()| refuse(base.as_str(), "cannot have a path below it"))?;
        segments.pop_if_empty();
        segments.extend(parts);
        // The trailing empty segment keeps the result a directory.
        segments.push("");
    }
    Ok(url)
}

/// One target of a PowerTool's run in a cluster.
#[derive(Clone, Copy, Debug)]
pub struct TargetRef<'a> {
    /// The PowerTool's namespace.
    pub namespace: &'a str,
    pub powertool: &'a str,
    /// The target pod's namespace.
    pub target_namespace: &'a str,
    /// The run's name (`g<generation>-<uid prefix>`).
    pub run: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
}

/// Every run of one PowerTool: `<base>/<namespace>/<powertool>/`.
pub fn powertool_dir(
    spec_url: Option<&str>,
    default: &Url,
    namespace: &str,
    powertool: &str,
) -> Result<Url, OutputError> {
    below(&cluster_base(spec_url, default)?, &[namespace, powertool])
}

/// One target's artifacts: `<base>/<namespace>/<powertool>/<run>/<pod>/<container>/`.
pub fn target_dir(
    spec_url: Option<&str>,
    default: &Url,
    t: &TargetRef<'_>,
) -> Result<Url, OutputError> {
    let pod = if t.target_namespace == t.namespace {
        t.pod.to_owned()
    } else {
        format!("{}_{}", t.target_namespace, t.pod)
    };
    below(
        &cluster_base(spec_url, default)?,
        &[t.namespace, t.powertool, t.run, &pod, t.container],
    )
}

/// A PowerTool's target as its location: the one call the agents and the operator's image tools
/// make, so they cannot disagree.
#[cfg(feature = "api")]
pub fn of_target(
    pt: &toe_common::api::PowerTool,
    t: &toe_common::api::SelectedTarget,
    default: &Url,
) -> Result<Url, OutputError> {
    let run = toe_common::api::run_name(
        pt.metadata.uid.as_deref().unwrap_or_default(),
        pt.metadata.generation.unwrap_or(0),
    );
    target_dir(
        spec_url(pt),
        default,
        &TargetRef {
            namespace: pt.metadata.namespace.as_deref().unwrap_or_default(),
            powertool: pt.metadata.name.as_deref().unwrap_or_default(),
            target_namespace: &t.namespace,
            run: &run,
            pod: &t.pod,
            container: &t.container,
        },
    )
}

/// Every run of a PowerTool, where processing reads them.
#[cfg(feature = "api")]
pub fn of_powertool(pt: &toe_common::api::PowerTool, default: &Url) -> Result<Url, OutputError> {
    powertool_dir(
        spec_url(pt),
        default,
        pt.metadata.namespace.as_deref().unwrap_or_default(),
        pt.metadata.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(feature = "api")]
fn spec_url(pt: &toe_common::api::PowerTool) -> Option<&str> {
    pt.spec.output.as_ref().and_then(|o| o.url.as_deref())
}

/// Whether `url` lies at or below one of `allowed` (same scheme and bucket, and a path below,
/// compared segment by segment after the URL parser has resolved `.` and `..`). The agents run as
/// root on every node: where a tenant may have them write is the admin's choice, not the
/// tenant's.
#[must_use]
pub fn is_allowed(url: &Url, allowed: &[Url]) -> bool {
    let segments = |u: &Url| -> Vec<String> {
        u.path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let path = segments(url);
    allowed.iter().any(|a| {
        a.scheme() == url.scheme()
            && a.host_str() == url.host_str()
            && a.port() == url.port()
            && path.starts_with(&segments(a))
    })
}

/// Output locations from a comma-separated list (`TOE_ALLOWED_OUTPUTS`), each as a directory.
pub fn allowed_outputs(list: &str) -> Result<Vec<Url>, OutputError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| output_base(s, None))
        .collect()
}

/// A local run's directory: `<base>/<run id>/`.
pub fn local_run_dir(base: &Url, run_id: &str) -> Result<Url, OutputError> {
    below(base, &[run_id])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> Url {
        Url::parse("file:///var/lib/toe/artifacts").unwrap()
    }

    const T: TargetRef<'static> = TargetRef {
        namespace: "team-a",
        powertool: "checkout-cpu",
        target_namespace: "team-a",
        run: "g3-1a2b3c4d",
        pod: "web-0",
        container: "app",
    };

    #[test]
    fn every_kind_of_output_url_gives_the_same_layout() {
        let cases = [
            (
                Some("file:///data/toe"),
                "file:///data/toe/team-a/checkout-cpu/g3-1a2b3c4d/web-0/app/",
            ),
            (
                Some("s3://bucket/profiles/"),
                "s3://bucket/profiles/team-a/checkout-cpu/g3-1a2b3c4d/web-0/app/",
            ),
            (
                Some("/data/toe"),
                "file:///data/toe/team-a/checkout-cpu/g3-1a2b3c4d/web-0/app/",
            ),
            (
                None,
                "file:///var/lib/toe/artifacts/team-a/checkout-cpu/g3-1a2b3c4d/web-0/app/",
            ),
        ];
        for (spec, want) in cases {
            let t = target_dir(spec, &default(), &T).unwrap();
            assert_eq!(t.as_str(), want, "{spec:?}");
            let pt = powertool_dir(spec, &default(), T.namespace, T.powertool).unwrap();
            assert!(t.as_str().starts_with(pt.as_str()), "{spec:?}: {pt} / {t}");
        }
    }

    #[test]
    fn unusable_output_urls_are_refused_with_the_reason() {
        for (given, why) in [
            ("toe-output", "relative path"),
            ("./x", "relative path"),
            ("ftp://host/x", "unknown scheme"),
            ("s3:///prefix", "no bucket"),
            ("", "empty"),
            ("file:///tmp/out#frag", "?query or #fragment"),
            ("s3://bucket/allowed?x=/elsewhere", "?query or #fragment"),
        ] {
            let err = output_base(given, None).unwrap_err().to_string();
            assert!(err.contains(why), "{given}: {err}");
        }
        let local = output_base("toe-output", Some(Path::new("/work"))).unwrap();
        assert_eq!(local.as_str(), "file:///work/toe-output/");
        // A plain path keeps '?' and '#' as parts of its names.
        let odd = output_base("/tmp/a?b#c", None).unwrap();
        assert_eq!(odd.as_str(), "file:///tmp/a%3Fb%23c/");
    }

    #[test]
    fn a_target_in_another_namespace_stays_below_the_powertool() {
        let other = TargetRef {
            target_namespace: "payments",
            ..T
        };
        let t = target_dir(None, &default(), &other).unwrap();
        assert!(
            t.as_str()
                .ends_with("/team-a/checkout-cpu/g3-1a2b3c4d/payments_web-0/app/"),
            "{t}"
        );
    }

    #[test]
    fn only_allowed_prefixes_are_allowed() {
        let allowed = allowed_outputs("file:///var/lib/toe/artifacts/, s3://bucket/toe").unwrap();
        let ok = |u: &str| is_allowed(&Url::parse(u).unwrap(), &allowed);
        assert!(ok("file:///var/lib/toe/artifacts/shop/p/g1-x/web/app/"));
        assert!(ok("s3://bucket/toe/shop/"));
        assert!(!ok("file:///proc/1/root/tmp/x/"));
        assert!(!ok("file:///var/lib/toe/artifacts/../../../proc/1/root/"));
        assert!(!ok("file:///var/lib/toe/artifacts-other/"));
        assert!(!ok("s3://other-bucket/toe/"));
        assert!(!ok("s3://bucket/toe2/"));
    }

    #[test]
    fn names_cannot_climb_out_of_the_base() {
        let bad = TargetRef { pod: "..", ..T };
        assert!(target_dir(None, &default(), &bad).is_err());
        let bad = TargetRef {
            container: "a/b",
            ..T
        };
        assert!(target_dir(None, &default(), &bad).is_err());
    }
}

//! Processing against object stores: open a URL, read the captures of every source within the
//! window, process them, write the outputs under a timestamped directory, and expire old ones.

use std::{
    io::{Read as _, Seek as _},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::{
    ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart, path::Path as StorePath,
};
use toe_artifacts::store::{OpenError, as_dir, open, parse_stamp, stamp};
use url::Url;

use crate::{
    capture::{self, Capture},
    process::{Content, Options, Outcome, Pass},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Read(#[from] capture::ReadError),
    #[error("writing {path}: {source}")]
    Put {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("processing stopped: {0}")]
    Aborted(String),
    #[error("scratch space for the merge: {0}")]
    Scratch(#[source] std::io::Error),
    #[error("reading the output {name} back: {source}")]
    Spool {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("expiring {path}: {source}")]
    Delete {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

/// Where captures are read from: a URL and the label its runs get.
#[derive(Clone, Debug)]
pub struct Source {
    pub url: Url,
    pub label: String,
}

/// One processing job.
#[derive(Clone, Debug)]
pub struct Job {
    pub sources: Vec<Source>,
    /// Captures whose sampling ended within this long before `now`; all when `None`.
    pub window: Option<Duration>,
    pub now: SystemTime,
    /// The processing's directory; this job writes to `<output>/<stamp>/`.
    pub output: Url,
    /// Output directories older than this are deleted after a successful job.
    pub retention: Option<Duration>,
    pub options: Options,
}

/// What a job did.
#[derive(Debug, Default)]
pub struct JobOutcome {
    pub outcome: Outcome,
    /// The directory it wrote, as a URL.
    pub dir: String,
    /// Every file written, as a URL.
    pub written: Vec<String>,
    /// Output directories removed by retention.
    pub expired: Vec<String>,
}

/// How many captures `source` holds (listing only, nothing is read).
pub async fn count_captures(source: &Source) -> Result<usize, StoreError> {
    let (store, base) = open(&source.url)?;
    Ok(capture::list(store.as_ref(), &base).await?.len())
}

/// Whether `c` ended within `window` before `now` (always, without a window).
#[must_use]
pub fn within(c: &Capture, window: Option<Duration>, now: SystemTime) -> bool {
    window.is_none_or(|w| {
        let since_ms = now
            .checked_sub(w)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        c.summary.ended_unix_ms() >= since_ms
    })
}

/// Captures read ahead while the one before is merged: store latency overlaps merging, and at
/// most this many captures are in memory at once.
const READ_AHEAD: usize = 4;

/// Runs the job: read the captures one by one into a processing pass, then write and expire.
/// Memory holds a few captures at a time, whatever the number of captures.
pub async fn run(job: &Job) -> Result<JobOutcome, StoreError> {
    let mut pass = Pass::new(&job.options).map_err(StoreError::Scratch)?;
    for s in &job.sources {
        let (store, base) = open(&s.url)?;
        let dirs = capture::list(store.as_ref(), &base).await?;
        let (store, base) = (&store, &base);
        let mut loads = futures::stream::iter(dirs)
            .map(|(dir, files)| async move {
                let fetched = capture::fetch(store.as_ref(), &dir, &files).await?;
                // Parsed off this task, beside the merge of the capture before and the reads
                // of the ones after.
                let (base, label, path) = (base.clone(), s.label.clone(), dir.to_string());
                tokio::task::spawn_blocking(move || capture::parse(&base, &dir, fetched, &label))
                    .await
                    .map_err(|e| capture::ReadError::Parse {
                        path,
                        message: format!("parsing stopped: {e}"),
                    })?
            })
            .buffered(READ_AHEAD);
        while let Some(loaded) = loads.next().await {
            match loaded {
                Ok(c) if within(&c, job.window, job.now) => pass.add(c),
                Ok(_) => {}
                // A capture is untrusted input: one that cannot be read is left out, with its
                // reason in the report and the status, and the others are processed.
                Err(e) => pass.skip(&e.to_string()),
            }
        }
    }
    write(job, pass.finish().await).await
}

/// Writes a pass's outputs under `<output>/<stamp>/`, then expires old output directories.
async fn write(job: &Job, mut outcome: Outcome) -> Result<JobOutcome, StoreError> {
    let (store, base) = open(&job.output)?;
    let name = stamp(job.now);
    let dir = base.clone().join(name.as_str());
    let dir_url = as_dir(&job.output)
        .join(&format!("{name}/"))
        .map_or_else(|_| dir.to_string(), |u| u.to_string());
    let written: Vec<String> = outcome
        .files
        .iter()
        .map(|(file, _)| format!("{dir_url}{file}"))
        .collect();
    // Several outputs in flight: against a remote store each upload is mostly waiting.
    let (store_ref, dir_ref) = (store.as_ref(), &dir);
    futures::stream::iter(outcome.files.iter_mut())
        .map(|(file, content)| async move {
            let path: StorePath = dir_ref
                .parts()
                .chain(file.split('/').map(object_store::path::PathPart::from))
                .collect();
            put_content(store_ref, &path, file, content).await
        })
        .buffer_unordered(UPLOADS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let expired = match job.retention {
        Some(keep) => {
            expire(
                store.as_ref(),
                &base,
                job.now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH),
            )
            .await?
        }
        None => Vec::new(),
    };
    Ok(JobOutcome {
        outcome,
        dir: dir_url,
        written,
        expired,
    })
}

/// Bytes per part of a multipart upload, and parts in flight: a large output is read from its
/// temporary file and sent in parts, never held whole.
const PART: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 2;
/// Output files uploaded at once.
const UPLOADS_IN_FLIGHT: usize = 4;

async fn put_content(
    store: &dyn ObjectStore,
    path: &StorePath,
    name: &str,
    content: &mut Content,
) -> Result<(), StoreError> {
    let spool = |source| StoreError::Spool {
        name: name.to_owned(),
        source,
    };
    let put_err = |source| StoreError::Put {
        path: path.to_string(),
        source,
    };
    let file = match content {
        Content::Bytes(b) => return put(store, path, b.clone()).await,
        Content::Spooled(f) => f,
    };
    file.rewind().map_err(spool)?;
    if !file.is_rolled() {
        let mut v = Vec::new();
        file.read_to_end(&mut v).map_err(spool)?;
        return put(store, path, Bytes::from(v)).await;
    }
    let mut upload = WriteMultipart::new_with_chunk_size(
        store.put_multipart(path).await.map_err(put_err)?,
        PART,
    );
    let mut buf = vec![0u8; PART];
    loop {
        let n = file.read(&mut buf).map_err(spool)?;
        if n == 0 {
            break;
        }
        upload
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(put_err)?;
        upload.write(&buf[..n]);
    }
    upload.finish().await.map_err(put_err)?;
    Ok(())
}

async fn put(store: &dyn ObjectStore, path: &StorePath, data: Bytes) -> Result<(), StoreError> {
    store
        .put(path, PutPayload::from_bytes(data))
        .await
        .map(|_| ())
        .map_err(|source| StoreError::Put {
            path: path.to_string(),
            source,
        })
}

/// Deletes every `<base>/<stamp>/` directory older than `before`; returns their names.
pub async fn expire(
    store: &dyn ObjectStore,
    base: &StorePath,
    before: SystemTime,
) -> Result<Vec<String>, StoreError> {
    let listed = store
        .list_with_delimiter(Some(base))
        .await
        .map_err(|source| StoreError::Delete {
            path: base.to_string(),
            source,
        })?;
    let mut removed = Vec::new();
    for dir in listed.common_prefixes {
        let Some(name) = dir.filename() else { continue };
        if parse_stamp(name).is_none_or(|t| t >= before) {
            continue;
        }
        let objects: Vec<object_store::ObjectMeta> = store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|source| StoreError::Delete {
                path: dir.to_string(),
                source,
            })?;
        for o in objects {
            store
                .delete(&o.location)
                .await
                .map_err(|source| StoreError::Delete {
                    path: o.location.to_string(),
                    source,
                })?;
        }
        removed.push(name.to_owned());
    }
    Ok(removed)
}

/// Every output directory below `base` (newest first) with its files: what a report server lists.
pub async fn list_outputs(
    store: &dyn ObjectStore,
    base: &StorePath,
) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let objects: Vec<object_store::ObjectMeta> = store
        .list(Some(base))
        .try_collect()
        .await
        .map_err(|source| {
            StoreError::Read(capture::ReadError::List {
                prefix: base.to_string(),
                source,
            })
        })?;
    let mut dirs: std::collections::BTreeMap<String, Vec<String>> =
        std::collections::BTreeMap::new();
    for o in objects {
        let rel: Vec<String> = o
            .location
            .prefix_match(base)
            .map(|p| p.map(|x| x.as_ref().to_owned()).collect())
            .unwrap_or_default();
        if let Some(pos) = rel.iter().position(|p| parse_stamp(p).is_some()) {
            dirs.entry(rel[..=pos].join("/"))
                .or_default()
                .push(rel[pos + 1..].join("/"));
        }
    }
    let mut v: Vec<(String, Vec<String>)> = dirs.into_iter().collect();
    v.sort_by(|a, b| {
        let stamp = |d: &str| d.rsplit('/').next().unwrap_or_default().to_owned();
        stamp(&b.0).cmp(&stamp(&a.0)).then_with(|| a.0.cmp(&b.0))
    });
    for (_, files) in &mut v {
        files.sort();
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_731_722);
        assert_eq!(parse_stamp(&stamp(t)), Some(t));
        assert_eq!(parse_stamp("g1-abcdef12"), None);
    }

    fn fixtures_url() -> Url {
        Url::from_directory_path(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
            .unwrap()
    }

    #[tokio::test]
    async fn a_job_writes_its_outputs_and_retention_expires_old_ones() {
        let out = tempfile::tempdir().unwrap();
        let output = Url::from_directory_path(out.path().join("ns/weekly")).unwrap();
        let old = SystemTime::now() - Duration::from_hours(3 * 24);
        std::fs::create_dir_all(out.path().join("ns/weekly").join(stamp(old))).unwrap();
        std::fs::write(
            out.path()
                .join("ns/weekly")
                .join(stamp(old))
                .join("report.html"),
            "x",
        )
        .unwrap();
        let job = Job {
            sources: vec![Source {
                url: fixtures_url(),
                label: "recorded".into(),
            }],
            window: None,
            now: SystemTime::now(),
            output: output.clone(),
            retention: Some(Duration::from_hours(24)),
            options: Options {
                merged_flamegraph: true,
                html_report: true,
                title: "recorded".into(),
                ..Options::default()
            },
        };
        let done = run(&job).await.unwrap();
        assert_eq!(done.outcome.captures, 17);
        assert_eq!(done.expired, [stamp(old)]);
        assert!(
            !out.path()
                .join("ns/weekly")
                .join(stamp(old))
                .join("report.html")
                .exists()
        );
        let report = done
            .written
            .iter()
            .find(|u| u.ends_with("/report.html"))
            .unwrap();
        let path = Url::parse(report).unwrap().to_file_path().unwrap();
        assert!(std::fs::read_to_string(path).unwrap().contains("oom-kill"));
        let (store, base) = open(&Url::from_directory_path(out.path()).unwrap()).unwrap();
        let listed = list_outputs(store.as_ref(), &base).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].0.starts_with("ns/weekly/"), "{listed:?}");
        assert!(listed[0].1.contains(&"report.html".to_owned()));
    }

    /// The cloud stores are built in: their URLs open (credentials from the environment; nothing
    /// is sent until a read or write). Azure also needs AZURE_STORAGE_ACCOUNT_NAME, so it is
    /// opened by its https form, which names the account.
    #[test]
    fn cloud_urls_open() {
        for url in [
            "s3://bucket/toe/",
            "gs://bucket/toe/",
            "https://account.blob.core.windows.net/container/toe/",
        ] {
            let (_, path) =
                open(&Url::parse(url).unwrap()).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(path.as_ref(), "toe", "{url}");
        }
    }

    #[tokio::test]
    async fn the_window_leaves_out_older_captures() {
        let far_future = SystemTime::now() + Duration::from_hours(10 * 365 * 24);
        let (store, base) = open(&fixtures_url()).unwrap();
        let captures = capture::load_all(store.as_ref(), &base, "").await.unwrap();
        let kept = |window| {
            captures
                .iter()
                .filter(|c| within(c, window, far_future))
                .count()
        };
        assert_eq!(kept(Some(Duration::from_hours(1))), 0);
        assert_eq!(kept(None), 17);
    }

    /// Untrusted captures: each kind of hostile one is left out (or cut) with its reason, and the
    /// good capture beside them is processed.
    #[tokio::test]
    async fn hostile_captures_are_left_out_with_their_reason() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cpu");
        let put = |capture: &str, name: &str, data: &[u8]| {
            let d = dir.path().join(capture);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), data).unwrap();
        };
        let good = std::fs::read(fixtures.join("summary.json")).unwrap();
        // A good capture.
        for f in std::fs::read_dir(&fixtures).unwrap() {
            let f = f.unwrap();
            put(
                "g1-good/web-0/app",
                &f.file_name().to_string_lossy(),
                &std::fs::read(f.path()).unwrap(),
            );
        }
        // A summary nested far deeper than any real one: read without recursing (serde_json skips
        // unknown values iteratively and limits the depth of known ones).
        let nested = format!(
            "{{\"tool\": \"cpu-profile\", \"extra\": {}1{}}}",
            "{\"a\": ".repeat(100_000),
            "}".repeat(100_000)
        );
        put("g1-nested/web-1/app", "summary.json", nested.as_bytes());
        // A folded file that is not one.
        put("g1-folded/web-2/app", "summary.json", &good);
        put(
            "g1-folded/web-2/app",
            "stacks.folded",
            b"main;work no-count-here\n",
        );
        // A pprof that is not one, and one that inflates to more than 256 MiB (a gzip bomb).
        put("g1-notpprof/web-3/app", "summary.json", &good);
        put(
            "g1-notpprof/web-3/app",
            "cpu.pb.gz",
            b"this is not a profile",
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..300 {
            gz.write_all(&zeros).unwrap();
        }
        put("g1-bomb/web-4/app", "summary.json", &good);
        put("g1-bomb/web-4/app", "cpu.pb.gz", &gz.finish().unwrap());
        // A stack 5000 frames deep.
        let deep = format!("app (1);{} 7\n", vec!["f"; 5000].join(";"));
        put("g1-deep/web-5/app", "summary.json", &good);
        put("g1-deep/web-5/app", "stacks.folded", deep.as_bytes());
        let out = tempfile::tempdir().unwrap();
        let job = Job {
            sources: vec![Source {
                url: Url::from_directory_path(dir.path()).unwrap(),
                label: String::new(),
            }],
            window: None,
            now: SystemTime::now(),
            output: Url::from_directory_path(out.path()).unwrap(),
            retention: None,
            options: Options {
                merged_flamegraph: true,
                merged_pprof: true,
                html_report: true,
                ..Options::default()
            },
        };
        let mut done = run(&job).await.unwrap();
        let o = &mut done.outcome;
        assert_eq!(o.skipped.len(), 1, "{:?}", o.skipped);
        assert!(
            o.skipped[0].contains("g1-folded") && o.skipped[0].contains("not `frames count`"),
            "{:?}",
            o.skipped
        );
        assert_eq!(o.captures, 5, "every capture but the unreadable folded one");
        let notes = o.notes.join("\n");
        assert!(
            notes.contains("web-3/app") && notes.contains("not a pprof profile"),
            "{notes}"
        );
        assert!(
            notes.contains("web-4/app") && notes.contains("inflates to more than"),
            "{notes}"
        );
        let folded = o.file("cpu.folded").unwrap();
        let text = String::from_utf8_lossy(&folded);
        let deep_line = text
            .lines()
            .find(|l| l.contains(capture::CUT_FRAME))
            .unwrap();
        assert_eq!(deep_line.split(';').count(), capture::MAX_DEPTH + 1);
        let report = String::from_utf8(o.file("report.html").unwrap().to_vec()).unwrap();
        assert!(report.contains("g1-folded") && report.contains("deeper than 1024 frames"));
    }
}

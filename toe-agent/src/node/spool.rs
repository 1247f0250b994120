//! Artifacts on the node's disk until the object store has them. Every cluster run writes into a
//! spool job first (a directory under the state directory that survives agent restarts); the
//! job is uploaded when the run ends and retried with backoff while the store is unreachable.
//! A job's `job.json` is written before the run starts, so a restarted agent knows which runs a
//! crash cut short and never starts them again.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use toe_common::api::TargetPhase;
use url::Url;

use crate::sink::{ArtifactSink, SinkError};

/// What a spool job is for and how its run ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub namespace: String,
    pub powertool: String,
    pub uid: String,
    pub generation: i64,
    /// The target's namespace, pod and container.
    pub target: (String, String, String),
    /// The target's directory in the object store (ends with `/`).
    pub remote: String,
    /// The target's final phase, once the run is over; `None` while it runs.
    #[serde(default)]
    pub phase: Option<TargetPhase>,
    #[serde(default)]
    pub message: Option<String>,
    /// Where each artifact goes (remote URLs), in the order the run wrote them.
    #[serde(default)]
    pub artifacts: Vec<String>,
}

pub struct Spool {
    root: PathBuf,
}

/// One job's directory: `job.json` and `files/`.
pub struct JobDir {
    dir: PathBuf,
    pub job: Job,
}

fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(tmp, path)
}

impl Spool {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let root = state_dir.join("spool");
        fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// A new job, recorded on disk before anything runs.
    pub fn create(&self, job: Job) -> io::Result<JobDir> {
        let (ns, pod, container) = &job.target;
        // Kubernetes names are DNS labels/subdomains: safe as one path component each.
        let dir = self.root.join(format!(
            "{}-{}-{ns}-{pod}-{container}",
            job.uid, job.generation
        ));
        fs::create_dir_all(dir.join("files"))?;
        let d = JobDir { dir, job };
        d.save()?;
        Ok(d)
    }

    /// Every job on disk; unreadable ones are reported and skipped.
    #[must_use]
    pub fn jobs(&self) -> Vec<JobDir> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut jobs: Vec<JobDir> = rd
            .flatten()
            .filter_map(|e| {
                let dir = e.path();
                let text = fs::read(dir.join("job.json")).ok()?;
                match serde_json::from_slice(&text) {
                    Ok(job) => Some(JobDir { dir, job }),
                    Err(err) => {
                        tracing::warn!(dir = %dir.display(), %err, "unreadable spool job kept");
                        None
                    }
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.dir.cmp(&b.dir));
        jobs
    }
}

impl JobDir {
    pub fn save(&self) -> io::Result<()> {
        write_atomically(
            &self.dir.join("job.json"),
            &serde_json::to_vec_pretty(&self.job).expect("a job serializes"),
        )
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The sink the run writes through: to this job's disk, answering with remote URLs.
    pub fn sink(&self) -> Result<SpoolSink, url::ParseError> {
        Ok(SpoolSink {
            files: self.dir.join("files"),
            remote: Url::parse(&self.job.remote)?,
        })
    }

    /// Artifacts still waiting on disk.
    #[must_use]
    pub fn waiting(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.join("files"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| Path::new(n).extension().is_none_or(|e| e != "tmp"))
            .collect();
        names.sort();
        names
    }

    /// Uploads every waiting artifact, each removed from disk once the store has it; stops at
    /// the first failure (the rest wait for the next attempt). `file://` stores are written only
    /// beneath the one of `allowed` that holds the job's directory.
    pub async fn upload(&self, allowed: &[Url]) -> Result<usize, SinkError> {
        let url = Url::parse(&self.job.remote).map_err(|e| SinkError::Url {
            url: self.job.remote.clone(),
            reason: e.to_string(),
        })?;
        let store = crate::sink::for_node(&url, allowed)?;
        let mut done = 0;
        for name in self.waiting() {
            let path = self.dir.join("files").join(&name);
            let data = fs::read(&path).map_err(|e| SinkError::put(path.display(), e))?;
            store.put(&name, Bytes::from(data)).await?;
            // Uploaded twice at worst (a crash right here); never lost.
            let _ = fs::remove_file(&path);
            done += 1;
        }
        Ok(done)
    }

    pub fn remove(self) -> io::Result<()> {
        fs::remove_dir_all(&self.dir)
    }
}

/// Writes artifacts into a spool job and answers with where they will be in the store.
pub struct SpoolSink {
    files: PathBuf,
    remote: Url,
}

impl ArtifactSink for SpoolSink {
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>> {
        Box::pin(async move {
            let path = self.files.join(name);
            write_atomically(&path, &data).map_err(|e| SinkError::put(path.display(), e))?;
            Ok(self
                .remote
                .join(name)
                .map_or_else(|_| format!("{}{name}", self.remote), |u| u.to_string()))
        })
    }
}

/// The wait before upload attempt `n` (0-based): 1 s doubling to at most a minute.
#[must_use]
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_mins(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(remote: &str) -> Job {
        Job {
            namespace: "shop".into(),
            powertool: "p".into(),
            uid: "0123456789".into(),
            generation: 1,
            target: ("shop".into(), "web-1".into(), "app".into()),
            remote: remote.into(),
            ..Job::default()
        }
    }

    #[tokio::test]
    async fn artifacts_wait_on_disk_until_the_store_takes_them() {
        let state = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let missing = store.path().join("not-yet");
        let remote = Url::from_directory_path(missing.join("shop/p/run/")).unwrap();
        let spool = Spool::open(state.path()).unwrap();
        let d = spool.create(job(remote.as_str())).unwrap();
        let url = d
            .sink()
            .unwrap()
            .put("a.txt", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        assert_eq!(url, remote.join("a.txt").unwrap().to_string());
        // A file store whose root is a regular file stands in for an unreachable store.
        fs::write(&missing, b"in the way").unwrap();
        let allowed = [Url::from_directory_path(store.path()).unwrap()];
        assert!(d.upload(&allowed).await.is_err());
        assert_eq!(spool.jobs()[0].waiting(), ["a.txt"]);
        fs::remove_file(&missing).unwrap();
        assert_eq!(d.upload(&allowed).await.unwrap(), 1);
        assert!(d.waiting().is_empty());
        assert_eq!(
            fs::read(missing.join("shop/p/run/a.txt")).unwrap(),
            b"hi".to_vec()
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), Duration::from_mins(1));
    }
}

//! Where artifacts go. Collectors and encoders hand finished artifacts to an [`ArtifactSink`];
//! the object-store sink writes them to any `object_store` URL (file:// by default), the memory
//! sink keeps them for tests.

use std::{collections::BTreeMap, sync::Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, path::Path as StorePath};
use url::Url;

/// Why an artifact could not be stored, in one line (see [`toe_artifacts::store::explain`]).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("writing {location}: {reason}")]
    Put { location: String, reason: String },
}

impl SinkError {
    fn url(url: &Url, e: &object_store::Error) -> Self {
        Self::Url {
            url: url.to_string(),
            reason: toe_artifacts::store::explain(e),
        }
    }

    pub(crate) fn put(location: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::Put {
            location: location.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The reason alone, without the artifact it was about.
    #[must_use]
    pub fn reason(&self) -> &str {
        match self {
            Self::Url { reason, .. } | Self::Put { reason, .. } => reason,
        }
    }
}

pub trait ArtifactSink: Send + Sync {
    /// Stores `data` as `name` under the run's location; returns where it went.
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>>;

    /// Whether the store takes a write, asked before anything is attached so that a run never
    /// collects what it then cannot keep.
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The object a write check leaves for a moment in the run's directory.
const WRITE_CHECK: &str = ".toe-write-check";

/// Artifacts under one prefix of an object store.
pub struct ObjectStoreSink {
    store: Box<dyn ObjectStore>,
    prefix: StorePath,
    base: Url,
}

impl ObjectStoreSink {
    /// `url` is the run's directory, e.g. `file:///work/toe-output/cpu-profile-…/`.
    pub fn new(url: &Url) -> Result<Self, SinkError> {
        let (store, prefix) =
            object_store::parse_url_opts(url, toe_artifacts::store::env_options())
                .map_err(|e| SinkError::url(url, &e))?;
        let base = toe_artifacts::store::as_dir(url);
        Ok(Self {
            store,
            prefix,
            base,
        })
    }
}

impl ArtifactSink for ObjectStoreSink {
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>> {
        Box::pin(async move {
            let location = self.prefix.clone().join(name);
            // LocalFileSystem writes to a temporary file and renames it: a reader never sees a
            // half-written artifact, and an interrupted write leaves none.
            self.store
                .put(&location, PutPayload::from_bytes(data))
                .await
                .map_err(|e| {
                    tracing::debug!(error = ?e, %location, "store write failed");
                    SinkError::put(
                        self.base
                            .join(name)
                            .map_or_else(|_| location.to_string(), |u| u.to_string()),
                        toe_artifacts::store::explain(&e),
                    )
                })?;
            Ok(self
                .base
                .join(name)
                .map_or_else(|_| location.to_string(), |u| u.to_string()))
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if let Ok(dir) = self.base.to_file_path() {
                // A directory of this machine: asked without creating the run's directory, so a
                // run refused later (a bad target) leaves nothing behind.
                return writable_dir(&dir).map_err(|why| SinkError::put(&self.base, why));
            }
            self.put(WRITE_CHECK, Bytes::new()).await?;
            // A store that lets us write but not delete keeps an empty object; that is all.
            let _ = self
                .store
                .delete(&self.prefix.clone().join(WRITE_CHECK))
                .await;
            Ok(())
        })
    }
}

/// Whether files can be created in `dir`: the nearest directory of it that exists must be one
/// this process may write to (on a filesystem mounted read-write).
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or_else(|| std::path::Path::new("/"));
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("{} cannot be written: {e}", existing.display()))
}

/// Writes to `primary` until a write fails, then keeps that artifact and every later one in a
/// local directory, so that a store failing at the end of a run loses nothing (the node agent's
/// spool does the same, and retries).
pub struct SpoolingSink {
    primary: Box<dyn ArtifactSink>,
    dir: std::path::PathBuf,
    /// Why the primary store failed; from then on every artifact goes to `spool`.
    failed: Mutex<Option<String>>,
    spool: std::sync::OnceLock<ObjectStoreSink>,
}

impl SpoolingSink {
    #[must_use]
    pub fn new(primary: Box<dyn ArtifactSink>, dir: std::path::PathBuf) -> Self {
        Self {
            primary,
            dir,
            failed: Mutex::new(None),
            spool: std::sync::OnceLock::new(),
        }
    }

    /// Where the artifacts were kept instead, and why, once the primary store failed.
    #[must_use]
    pub fn spooled(&self) -> Option<(std::path::PathBuf, String)> {
        let why = self.failed.lock().expect("not poisoned").clone()?;
        Some((self.dir.clone(), why))
    }

    fn spool(&self) -> Result<&ObjectStoreSink, SinkError> {
        if let Some(s) = self.spool.get() {
            return Ok(s);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| SinkError::put(self.dir.display(), format!("creating the spool: {e}")))?;
        let url = Url::from_directory_path(&self.dir)
            .map_err(|()| SinkError::put(self.dir.display(), "not an absolute path"))?;
        Ok(self
            .spool
            .get_or_init(|| ObjectStoreSink::new(&url).expect("file:// opens")))
    }
}

impl ArtifactSink for SpoolingSink {
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>> {
        Box::pin(async move {
            if self.failed.lock().expect("not poisoned").is_none() {
                match self.primary.put(name, data.clone()).await {
                    Ok(at) => return Ok(at),
                    Err(e) => *self.failed.lock().expect("not poisoned") = Some(e.to_string()),
                }
            }
            self.spool()?.put(name, data).await
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.primary.check()
    }
}

/// Artifacts in a directory of this machine, written only beneath an admin's allowed root: the
/// node agent's `file://` stores. object_store's local store resolves paths as given and follows
/// symbolic links, so a link planted in a shared store directory (or a path through
/// `/proc/<pid>/root`) would turn a tenant's run into a root write anywhere on the node. Here
/// every directory below the root is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)` from the one before, and each file is created `O_EXCL | O_NOFOLLOW`
/// and renamed into place, so no path component can lead elsewhere. Hand-written because no
/// maintained object store crate opens its files beneath a directory descriptor.
pub struct BeneathSink {
    /// The admin's allowed directory (trusted as configured).
    root: std::path::PathBuf,
    /// The run's directory below it, one name per segment.
    below: Vec<String>,
    base: Url,
}

/// Where a `file://` URL lies below the allowed roots: the longest root that holds it, and the
/// (decoded) names of the directories from there.
fn beneath(url: &Url, allowed: &[Url]) -> Option<(std::path::PathBuf, Vec<String>)> {
    use std::path::Component;
    let path = url.to_file_path().ok()?;
    let root = allowed
        .iter()
        .filter(|a| a.scheme() == "file")
        .filter_map(|a| a.to_file_path().ok())
        .filter(|r| path.starts_with(r))
        .max_by_key(|r| r.components().count())?;
    let below = path
        .strip_prefix(&root)
        .ok()?
        .components()
        .map(|c| match c {
            Component::Normal(n) => n.to_str().map(str::to_owned),
            _ => None,
        })
        .collect::<Option<Vec<String>>>()?;
    Some((root, below))
}

impl BeneathSink {
    /// `url` (a `file://` run directory) below the longest of `allowed` that holds it.
    pub fn new(url: &Url, allowed: &[Url]) -> Result<Self, SinkError> {
        let (root, below) = beneath(url, allowed).ok_or_else(|| SinkError::Url {
            url: url.to_string(),
            reason: "not below an output location this node allows".into(),
        })?;
        Ok(Self {
            root,
            below,
            base: toe_artifacts::store::as_dir(url),
        })
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<(), String> {
        use nix::{
            errno::Errno,
            fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, renameat},
            sys::stat::{Mode, mkdirat},
        };
        // The root is the admin's (trusted as configured); the first run on a node creates it.
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("creating the store's root directory: {e}"))?;
        let mut dir = nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("the store's root directory: {e}"))?;
        let (parents, leaf) = match name.rsplit_once('/') {
            Some((p, l)) => (p.split('/').collect::<Vec<_>>(), l),
            None => (Vec::new(), name),
        };
        let parts = self.below.iter().map(String::as_str).chain(parents);
        for part in parts {
            if part.is_empty() || part == "." || part == ".." {
                return Err(format!("{part:?} cannot be a directory name"));
            }
            match mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(format!("creating a directory: {e}")),
            }
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS,
                );
            dir = openat2(&dir, part, how).map_err(|e| match e {
                Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR => {
                    "refused: the store's path holds a symbolic link or something that is not \
                     a directory"
                        .to_owned()
                }
                e => format!("opening a directory: {e}"),
            })?;
        }
        let tmp = format!(".{leaf}.{}.tmp", std::process::id());
        let create = || {
            openat(
                &dir,
                tmp.as_str(),
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
        };
        let fd = create()
            .or_else(|e| {
                // A temporary file an interrupted write left behind (ours: the name has our pid).
                if e != Errno::EEXIST {
                    return Err(e);
                }
                nix::unistd::unlinkat(&dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
                create()
            })
            .map_err(|e| format!("creating {leaf}: {e}"))?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, data)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("writing {leaf}: {e}"))?;
        // renameat replaces whatever `leaf` is (a symbolic link included) without following it.
        renameat(&dir, tmp.as_str(), &dir, leaf).map_err(|e| format!("renaming {leaf}: {e}"))
    }
}

impl ArtifactSink for BeneathSink {
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>> {
        Box::pin(async move {
            self.write(name, &data)
                .map_err(|why| SinkError::put(name, why))?;
            Ok(self
                .base
                .join(name)
                .map_or_else(|_| format!("{}{name}", self.base), |u| u.to_string()))
        })
    }
}

/// The sink a node agent uploads a run to: beneath its allowed root for `file://` stores, the
/// object store otherwise (a bucket's own permissions bound what the agent's credentials reach).
pub fn for_node(url: &Url, allowed: &[Url]) -> Result<Box<dyn ArtifactSink>, SinkError> {
    if url.scheme() == "file" {
        Ok(Box::new(BeneathSink::new(url, allowed)?))
    } else {
        Ok(Box::new(ObjectStoreSink::new(url)?))
    }
}

/// Keeps artifacts in memory (tests, dry runs).
#[derive(Default)]
pub struct MemorySink {
    pub artifacts: Mutex<BTreeMap<String, Bytes>>,
}

impl ArtifactSink for MemorySink {
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>> {
        Box::pin(async move {
            self.artifacts
                .lock()
                .expect("not poisoned")
                .insert(name.to_owned(), data);
            Ok(format!("memory:{name}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_writes_under_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let url = Url::from_directory_path(dir.path().join("run-1")).unwrap();
        let sink = ObjectStoreSink::new(&url).unwrap();
        let where_ = sink.put("a.txt", Bytes::from_static(b"hi")).await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("run-1/a.txt")).unwrap(),
            b"hi"
        );
        assert!(
            where_.starts_with("file://") && where_.ends_with("/run-1/a.txt"),
            "{where_}"
        );
    }

    #[tokio::test]
    async fn a_local_write_check_creates_nothing_and_names_what_is_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("out/run-1");
        ObjectStoreSink::new(&dir_url(&run))
            .unwrap()
            .check()
            .await
            .unwrap();
        assert!(!dir.path().join("out").exists());
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = ObjectStoreSink::new(&dir_url(&dir.path().join("file/run-1")))
            .unwrap()
            .check()
            .await
            .unwrap_err();
        assert!(err.reason().ends_with("/file is not a directory"), "{err}");
    }

    fn dir_url(p: &std::path::Path) -> Url {
        Url::from_directory_path(p).unwrap()
    }

    #[tokio::test]
    async fn a_node_store_is_written_beneath_its_root_and_never_through_a_link() {
        let store = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let allowed = [dir_url(store.path())];
        // The plain case: directories created, the file in place.
        let run = store.path().join("shop/cpu/g1-abc/web-1/app");
        let sink = for_node(&dir_url(&run), &allowed).unwrap();
        let at = sink
            .put("summary.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(run.join("summary.json")).unwrap(), b"{}");
        assert_eq!(at, dir_url(&run).join("summary.json").unwrap().as_str());
        // A directory of the path replaced by a link to elsewhere: refused, nothing written there.
        std::os::unix::fs::symlink(elsewhere.path(), store.path().join("team")).unwrap();
        let linked = store.path().join("team/cpu/run/web-1/app");
        let err = for_node(&dir_url(&linked), &allowed)
            .unwrap()
            .put("summary.json", Bytes::from_static(b"{}"))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        // Even a link that stays inside the store: whoever can plant one can re-point it later.
        std::os::unix::fs::symlink("shop", store.path().join("alias")).unwrap();
        let aliased = store.path().join("alias/cpu/g1-abc/web-1/app");
        assert!(
            for_node(&dir_url(&aliased), &allowed)
                .unwrap()
                .put("other.json", Bytes::from_static(b"{}"))
                .await
                .is_err()
        );
        assert!(!run.join("other.json").exists());
        // A link where the file goes is replaced, not followed.
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, run.join("stacks.folded")).unwrap();
        sink.put("stacks.folded", Bytes::from_static(b"a 1\n"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(run.join("stacks.folded")).unwrap(), b"a 1\n");
        // Outside every allowed root: no sink at all.
        assert!(for_node(&dir_url(elsewhere.path()), &allowed).is_err());
    }

    #[test]
    fn unsupported_scheme_is_a_clear_error() {
        let err = ObjectStoreSink::new(&Url::parse("ftp://example.com/x").unwrap())
            .err()
            .unwrap();
        assert!(err.to_string().contains("ftp://example.com/x"), "{err}");
    }
}

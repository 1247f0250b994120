//! Where artifacts go. Collectors and encoders hand finished artifacts to an [`ArtifactSink`];
//! the object-store sink writes them to any `object_store` URL (file:// by default), the memory
//! sink keeps them for tests.

use std::{collections::BTreeMap, sync::Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, path::Path as StorePath};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output URL {url}: {source}")]
    Url {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("writing {location}: {source}")]
    Put {
        location: String,
        #[source]
        source: object_store::Error,
    },
}

pub trait ArtifactSink: Send + Sync {
    /// Stores `data` as `name` under the run's location; returns where it went.
    fn put<'a>(&'a self, name: &'a str, data: Bytes) -> BoxFuture<'a, Result<String, SinkError>>;
}

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
            object_store::parse_url_opts(url, toe_artifacts::store::env_options()).map_err(
                |source| SinkError::Url {
                    url: url.to_string(),
                    source,
                },
            )?;
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
                .map_err(|source| SinkError::Put {
                    location: location.to_string(),
                    source,
                })?;
            Ok(self
                .base
                .join(name)
                .map_or_else(|_| location.to_string(), |u| u.to_string()))
        })
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

    #[test]
    fn unsupported_scheme_is_a_clear_error() {
        let err = ObjectStoreSink::new(&Url::parse("ftp://example.com/x").unwrap())
            .err()
            .unwrap();
        assert!(err.to_string().contains("ftp://example.com/x"), "{err}");
    }
}

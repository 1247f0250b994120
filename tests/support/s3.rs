//! A real S3-compatible server on loopback for one test: s3s-fs (built by `cargo xtask bootstrap
//! --tests`), which checks every request's SigV4 signature against its one key pair and keeps each
//! bucket as a directory. Stopped on drop.
//!
//! Without credentials an S3 client falls back to the cloud's instance-metadata address; no test
//! may ever reach it. Every environment [`S3Server::env`] gives names explicit keys and points the
//! metadata endpoint at a [`MetadataTrap`] on loopback, which counts whoever knocks.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub const ACCESS_KEY: &str = "toe-test-access-key";
pub const SECRET_KEY: &str = "toe-test-secret-key-not-a-real-one";
/// The bucket every server starts with.
pub const BUCKET: &str = "toe-artifacts";

pub struct S3Server {
    bin: PathBuf,
    /// The address it listens on: loopback, or a link the harness made (the pods' bridge).
    host: String,
    root: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    trap: MetadataTrap,
}

impl S3Server {
    /// A server with [`BUCKET`], or None where the test skips (not bootstrapped, outside CI).
    #[must_use]
    pub fn start(test: &str) -> Option<Self> {
        Self::start_on(test, "127.0.0.1")
    }

    /// [`Self::start`], listening on `host` (with its metadata stand-in), which must be an
    /// address of a link the harness made.
    #[must_use]
    pub fn start_on(test: &str, host: &str) -> Option<Self> {
        let bin = crate::bootstrapped_tool(test, "TOE_S3_SERVER", "tools/bin/s3s-fs")?;
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket directory");
        let mut s = Self {
            bin,
            host: host.to_owned(),
            root,
            port: crate::apiserver::free_port(),
            child: None,
            trap: MetadataTrap::start_on(host),
        };
        s.resume();
        Some(s)
    }

    /// Stops the server (an outage): connections are refused until [`Self::resume`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", &self.host, "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "s3s-fs did not listen on {}:{} within 10 s",
            self.host, self.port
        );
    }

    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// `s3://<BUCKET>/<path>`.
    #[must_use]
    pub fn url(&self, path: &str) -> url::Url {
        url::Url::parse(&format!("s3://{BUCKET}/{path}")).expect("an s3 URL")
    }

    /// The environment a TOE process needs to use this server with `secret` as its secret key
    /// (pass [`SECRET_KEY`] for the right one).
    #[must_use]
    pub fn env_with_secret(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_ENDPOINT", &self.endpoint()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_METADATA_ENDPOINT", &self.trap.endpoint()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[must_use]
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with_secret(SECRET_KEY)
    }

    /// The objects below `prefix` of [`BUCKET`] (relative paths), read from the server's disk.
    #[must_use]
    pub fn objects(&self, prefix: &str) -> Vec<PathBuf> {
        let base = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        walk(&base.join(prefix), &mut out);
        let mut rel: Vec<PathBuf> = out
            .into_iter()
            .filter_map(|p| p.strip_prefix(&base).ok().map(Path::to_owned))
            .collect();
        rel.sort();
        rel
    }

    /// Where object `key` of [`BUCKET`] lives on the server's disk (to seed recorded objects).
    #[must_use]
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// The bytes of object `key` of [`BUCKET`].
    #[must_use]
    pub fn read(&self, key: &Path) -> Vec<u8> {
        std::fs::read(self.root.path().join(BUCKET).join(key)).expect("object")
    }

    /// How many connections reached the instance-metadata stand-in.
    #[must_use]
    pub fn metadata_knocks(&self) -> usize {
        self.trap.knocks()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            // s3s-fs keeps its metadata and uploads in progress in hidden files.
            out.push(p);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback listener standing in for the instance-metadata address: it accepts and counts
/// connections and answers none of them.
pub struct MetadataTrap {
    host: String,
    port: u16,
    knocks: Arc<AtomicUsize>,
}

impl MetadataTrap {
    #[must_use]
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// A trap listening on `host`, an address of a link the harness made.
    #[must_use]
    pub fn start_on(host: &str) -> Self {
        let listener = TcpListener::bind((host, 0)).expect("a port for the metadata trap");
        let port = listener.local_addr().expect("bound").port();
        let knocks = Arc::new(AtomicUsize::new(0));
        let counter = knocks.clone();
        std::thread::spawn(move || {
            // Ends with the test process; each connection is dropped unanswered.
            for conn in listener.incoming() {
                if conn.is_ok() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self {
            host: host.to_owned(),
            port,
            knocks,
        }
    }

    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    #[must_use]
    pub fn knocks(&self) -> usize {
        self.knocks.load(Ordering::SeqCst)
    }
}

//! The crash-safe record of fault side effects. Every side effect is appended (and synced)
//! before it happens; a run that ends appends `end`. A later run, or `toe cleanup`, undoes what
//! a run whose owner died without `end` left behind: its worker processes (found by the run id
//! on their command line, so a worker spawned just before the crash is found too) and its files.
//!
//! JSON Lines, one object per entry: the format is plain, appends are atomic for small writes
//! with O_APPEND, and a torn last line (power loss mid-write) is skipped, not fatal.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Environment variable that moves the state directory (tests, non-root use).
pub const STATE_DIR_ENV: &str = "TOE_STATE_DIR";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/toe";
/// Marks worker processes on their command line: `toe __worker --run <id> ...`.
pub const WORKER_ARG: &str = "__worker";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    /// A run that may have side effects starts; `owner` is the process doing them.
    Begin { run: String, owner: Owner },
    /// Worker processes of `run` are about to be started.
    Workers { run: String },
    /// `path` is about to be created; `place` finds it again when the path no longer leads there
    /// (entries written before it existed have only the path).
    File {
        run: String,
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        place: Option<super::fill::Place>,
    },
    /// Everything of `run` is undone.
    End { run: String },
}

impl Entry {
    fn run(&self) -> &str {
        match self {
            Self::Begin { run, .. }
            | Self::Workers { run }
            | Self::File { run, .. }
            | Self::End { run } => run,
        }
    }
}

/// A process identity that survives pid reuse: pid and start time (clock ticks since boot).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    #[must_use]
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: crate::targets::start_time(pid).unwrap_or(0),
        }
    }

    #[must_use]
    pub fn alive(&self) -> bool {
        crate::targets::start_time(self.pid) == Some(self.start)
    }
}

pub use toe_artifacts::summary::fault::Recovered;

pub struct Ledger {
    path: PathBuf,
}

/// Where TOE keeps what must outlive a crash: `$TOE_STATE_DIR`, default `/var/lib/toe`.
#[must_use]
pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV).map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

impl Ledger {
    /// The ledger in [`state_dir`], created if needed.
    pub fn open_default() -> io::Result<Self> {
        Self::open(&state_dir())
    }

    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            path: dir.join("ledger.jsonl"),
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` and syncs it to disk before returning: the side effect comes after.
    pub fn record(&self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }

    fn entries(&self) -> io::Result<Vec<Entry>> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Undoes every run whose owner is gone without an `end`, records their `end`, and drops
    /// finished runs from the file. Runs of live owners (concurrent TOE processes) are left alone.
    pub fn recover(&self) -> io::Result<Recovered> {
        let lock = File::options()
            .create(true)
            .append(true)
            .open(self.path.with_extension("lock"))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from(e))?;
        let mut runs: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for e in self.entries()? {
            runs.entry(e.run().to_owned()).or_default().push(e);
        }
        let mut out = Recovered::default();
        let mut keep = Vec::new();
        for (run, entries) in runs {
            if entries.iter().any(|e| matches!(e, Entry::End { .. })) {
                continue;
            }
            let owner_alive = entries.iter().any(|e| match e {
                Entry::Begin { owner, .. } => owner.alive(),
                _ => false,
            });
            if owner_alive {
                keep.extend(entries);
                continue;
            }
            if entries.iter().any(|e| matches!(e, Entry::Workers { .. })) {
                out.workers_killed += kill_workers(&run);
            }
            let mut unreachable = false;
            for e in &entries {
                match e {
                    Entry::File {
                        place: Some(place),
                        path,
                        ..
                    } => match place.remove() {
                        super::fill::Removal::Removed(p) => out.files_removed.push(p),
                        super::fill::Removal::Gone => {}
                        super::fill::Removal::Unreachable => {
                            out.files_unreachable.push(path.clone());
                            unreachable = true;
                        }
                    },
                    Entry::File { path, .. } if fs::remove_file(path).is_ok() => {
                        out.files_removed.push(path.clone());
                    }
                    _ => {}
                }
            }
            if unreachable {
                // Its workers are gone; only the files remain to be tried again.
                keep.extend(
                    entries
                        .into_iter()
                        .filter(|e| matches!(e, Entry::File { .. })),
                );
            }
            out.runs.push(run);
        }
        // Rewrite with only the runs still in progress (atomically, via rename).
        let tmp = self.path.with_extension("tmp");
        let mut text = Vec::new();
        for e in &keep {
            text.extend(serde_json::to_vec(e).map_err(io::Error::other)?);
            text.push(b'\n');
        }
        fs::write(&tmp, &text)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        Ok(out)
    }
}

/// Kills every worker process of `run` (found by its command line); returns how many.
#[must_use = "the count says whether anything was left"]
pub fn kill_workers(run: &str) -> u32 {
    let mut n = 0;
    for pid in worker_pids(run) {
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
            nix::sys::signal::SIGKILL,
        )
        .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Processes whose command line is `... __worker --run <run> ...`.
#[must_use]
pub fn worker_pids(run: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.iter().any(|a| *a == WORKER_ARG.as_bytes())
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"--run" && w[1] == run.as_bytes())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_runs_are_undone_and_live_or_ended_runs_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let leftover = dir.path().join("fill-1");
        fs::write(&leftover, b"x").unwrap();
        let dead = Owner {
            pid: u32::MAX - 1,
            start: 1,
        };
        for e in [
            Entry::Begin {
                run: "dead".into(),
                owner: dead,
            },
            Entry::File {
                run: "dead".into(),
                path: leftover.clone(),
                place: None,
            },
            Entry::Begin {
                run: "live".into(),
                owner: Owner::current(),
            },
            Entry::Begin {
                run: "done".into(),
                owner: dead,
            },
            Entry::End { run: "done".into() },
        ] {
            ledger.record(&e).unwrap();
        }
        // A torn last line is skipped.
        OpenOptions::new()
            .append(true)
            .open(ledger.path())
            .unwrap()
            .write_all(b"{\"op\":\"fi")
            .unwrap();
        let r = ledger.recover().unwrap();
        assert_eq!(r.runs, vec!["dead".to_owned()]);
        assert_eq!(r.files_removed, vec![leftover.clone()]);
        assert!(!leftover.exists());
        let left = ledger.entries().unwrap();
        assert!(left.iter().all(|e| e.run() == "live"), "{left:?}");
        assert!(ledger.recover().unwrap().runs.is_empty());
    }
}

//! Volume fill: a file written into a directory of the target's filesystem view. The directory is
//! opened through `/proc/<pid>/root` with `openat2(RESOLVE_IN_ROOT)`, so `..` and symlinks
//! resolve inside the target's root and its mount namespace (a PV mounted in a container is
//! reached as the container sees it) and can never lead out of it.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::FaultError;
use crate::targets::Mount;

/// Space on a filesystem, as `df` computes it: used / (used + available to unprivileged users).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsSpace {
    pub size: u64,
    pub used: u64,
    pub avail: u64,
}

impl FsSpace {
    #[must_use]
    pub fn used_percent(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a percentage")]
        let p = self.used as f64 / (self.used + self.avail).max(1) as f64 * 100.0;
        p
    }
}

pub fn space(dir: &OwnedFd) -> Result<FsSpace, FaultError> {
    // SAFETY: zeroed statvfs is a valid out-parameter; the fd is open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), &raw mut st) } != 0 {
        return Err(FaultError::Io(std::io::Error::last_os_error()));
    }
    let f = st.f_frsize;
    Ok(FsSpace {
        size: st.f_blocks * f,
        used: (st.f_blocks - st.f_bfree) * f,
        avail: st.f_bavail * f,
    })
}

/// Rejects what is not a plain absolute path before any file system access.
pub fn check_path(path: &str) -> Result<(), FaultError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(FaultError::Refused(format!(
            "--path {path}: must be absolute (as the target sees it)"
        )));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(FaultError::Refused(format!(
            "--path {path}: \"..\" is not allowed"
        )));
    }
    if path.contains('\0') {
        return Err(FaultError::Refused("--path contains a NUL byte".into()));
    }
    Ok(())
}

/// Opens directory `path` as process `pid` sees it, never resolving outside its root.
pub fn open_dir(pid: u32, path: &str) -> Result<OwnedFd, FaultError> {
    check_path(path)?;
    let root_dir = crate::targets::open_in_root(
        pid,
        path,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    );
    root_dir.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && !crate::targets::running(pid) {
            return FaultError::Io(e);
        }
        FaultError::Refused(format!(
            "--path {path}: cannot open it as a directory inside the target ({e})"
        ))
    })
}

/// Creates `name` in `dir` (refusing an existing file or a symlink) and gives it `bytes` of
/// allocated space: fallocate where the filesystem supports it, else zeros written in 1 MiB
/// chunks. Returns the bytes actually allocated (less when the filesystem filled up first).
pub fn create(dir: &OwnedFd, name: &str, bytes: u64) -> Result<u64, FaultError> {
    let c = CString::new(name).expect("our own name");
    // SAFETY: valid dirfd and NUL-terminated name; the fd is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(FaultError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptor.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = i64::try_from(bytes).unwrap_or(i64::MAX);
    // SAFETY: valid fd; allocates blocks without writing them.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(bytes);
    }
    let chunk = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut f = std::fs::File::from(file);
    while done < bytes {
        let n = usize::try_from((bytes - done).min(chunk.len() as u64)).unwrap_or(chunk.len());
        match std::io::Write::write(&mut f, &chunk[..n]) {
            Ok(0) | Err(_) => break,
            Ok(w) => done += w as u64,
        }
    }
    let _ = f.sync_data();
    Ok(done)
}

/// Where a fill file lives, recorded before it is created so that a later cleanup can find it
/// even when the target process (and the way in through its `/proc/<pid>/root`) is gone: a PV
/// outlives the pod that filled it. The directory's device and inode identify it; nothing is
/// removed from a directory that does not match them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Place {
    pub pid: u32,
    /// The directory as the target sees it.
    pub dir: PathBuf,
    pub name: String,
    /// `st_dev` and `st_ino` of the directory.
    pub dev: u64,
    pub ino: u64,
    /// Inode of the target's mount namespace: other processes in it see the same tree.
    pub mnt_ns: u64,
    /// `major:minor` of the filesystem and the directory's path within it (from the target's
    /// mountinfo), to find it through any other mount of that filesystem, e.g. the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_device: Option<(u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_dir: Option<PathBuf>,
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter; the fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The path of `dir` (as seen in a mount namespace) inside its filesystem: the mount that holds
/// it (the longest mount point above it on that device) maps its point to its root.
fn path_in_filesystem(mounts: &[Mount], device: (u32, u32), dir: &Path) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.device == device)
        .filter_map(|m| Some((m, dir.strip_prefix(&m.point).ok()?)))
        .max_by_key(|(m, _)| m.point.components().count())
        .map(|(m, rest)| m.root.join(rest))
}

/// Directories that may be the recorded one, best first: through the target's root, through any
/// process in its mount namespace, through every mount of its filesystem in this namespace.
fn candidates(place: &Place, own_mounts: &[Mount]) -> Vec<PathBuf> {
    let rel = place.dir.strip_prefix("/").unwrap_or(&place.dir);
    let mut out = vec![Path::new(&format!("/proc/{}/root", place.pid)).join(rel)];
    if let Ok(procs) = std::fs::read_dir("/proc") {
        let same_ns = procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::metadata(format!("/proc/{p}/ns/mnt"))
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == place.mnt_ns)
            })
            .take(4);
        out.extend(same_ns.map(|p| Path::new(&format!("/proc/{p}/root")).join(rel)));
    }
    if let (Some(device), Some(fs_dir)) = (place.fs_device, &place.fs_dir) {
        for m in own_mounts.iter().filter(|m| m.device == device) {
            if let Ok(rest) = fs_dir.strip_prefix(&m.root) {
                out.push(m.point.join(rest));
            }
        }
    }
    out
}

impl Place {
    /// Describes `dir` (opened for `pid` at `path`) for the ledger.
    pub fn new(pid: u32, path: &str, dir: &OwnedFd, name: &str) -> Result<Self, FaultError> {
        let st = fstat(dir).map_err(FaultError::Io)?;
        let mnt_ns = std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(FaultError::Io)?;
        let device = (libc::major(st.st_dev), libc::minor(st.st_dev));
        let fs_dir = crate::targets::mounts(Path::new(&format!("/proc/{pid}/mountinfo")))
            .ok()
            .and_then(|m| path_in_filesystem(&m, device, Path::new(path)));
        Ok(Self {
            pid,
            dir: PathBuf::from(path),
            name: name.to_owned(),
            dev: st.st_dev,
            ino: st.st_ino,
            mnt_ns,
            fs_device: fs_dir.is_some().then_some(device),
            fs_dir,
        })
    }

    /// Removes the file through the first way in that leads to the recorded directory.
    #[must_use = "Unreachable means the file may still be there"]
    pub fn remove(&self) -> Removal {
        let own = crate::targets::mounts(Path::new("/proc/self/mountinfo")).unwrap_or_default();
        for dir in candidates(self, &own) {
            let Ok(f) = std::fs::File::open(&dir) else {
                continue;
            };
            let fd = OwnedFd::from(f);
            if !fstat(&fd).is_ok_and(|st| st.st_dev == self.dev && st.st_ino == self.ino) {
                continue;
            }
            return if remove(&fd, &self.name) {
                Removal::Removed(dir.join(&self.name))
            } else {
                Removal::Gone
            };
        }
        Removal::Unreachable
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    Removed(PathBuf),
    /// The directory was reached and the file is not in it.
    Gone,
    /// No way in leads to the directory now (its filesystem is mounted nowhere visible).
    Unreachable,
}

/// Removes `name` from `dir`.
#[must_use = "false means the file is still there"]
pub fn remove(dir: &OwnedFd, name: &str) -> bool {
    let c = CString::new(name).expect("our own name");
    // SAFETY: valid dirfd and NUL-terminated name.
    unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_absolute_paths_pass() {
        assert!(check_path("/data/cache").is_ok());
        for bad in ["data", "/data/../../etc", "/.."] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    fn mount(device: (u32, u32), root: &str, point: &str) -> Mount {
        Mount {
            device,
            root: root.into(),
            point: point.into(),
            fstype: "ext4".into(),
            options: Vec::new(),
        }
    }

    #[test]
    fn a_volume_is_found_again_through_another_mount_of_its_filesystem() {
        // In the container: the PV's directory of /dev/sda1 is mounted at /data.
        let container = [
            mount((0, 50), "/", "/"),
            mount((8, 1), "/kubelet/pods/p/volumes/v", "/data"),
        ];
        let fs_dir = path_in_filesystem(&container, (8, 1), Path::new("/data/cache")).unwrap();
        assert_eq!(fs_dir, Path::new("/kubelet/pods/p/volumes/v/cache"));
        // On the host, /dev/sda1 is mounted at /var/lib: the directory is under it.
        let host = [
            mount((8, 1), "/", "/var/lib"),
            mount((8, 2), "/", "/"),
            mount((8, 1), "/elsewhere", "/mnt"),
        ];
        let place = Place {
            pid: u32::MAX,
            dir: "/data/cache".into(),
            name: ".toe-fill-x".into(),
            dev: 0,
            ino: 0,
            mnt_ns: 0,
            fs_device: Some((8, 1)),
            fs_dir: Some(fs_dir),
        };
        let c = candidates(&place, &host);
        assert_eq!(
            c[0],
            Path::new(&format!("/proc/{}/root/data/cache", u32::MAX))
        );
        assert_eq!(
            c.last().unwrap(),
            Path::new("/var/lib/kubelet/pods/p/volumes/v/cache")
        );
        assert!(!c.iter().any(|p| p.starts_with("/mnt")), "{c:?}");
        // The longest mount point wins; another device's mounts never match.
        let nested = [mount((8, 1), "/", "/"), mount((8, 1), "/sub", "/data")];
        assert_eq!(
            path_in_filesystem(&nested, (8, 1), Path::new("/data/x")).unwrap(),
            Path::new("/sub/x")
        );
        assert!(path_in_filesystem(&nested, (9, 9), Path::new("/data/x")).is_none());
    }

    #[test]
    fn directories_open_through_the_process_root() {
        assert!(open_dir(std::process::id(), "/tmp/../../etc").is_err());
        assert!(open_dir(std::process::id(), "/").is_ok());
        assert!(open_dir(std::process::id(), "/no/such/dir").is_err());
    }
}

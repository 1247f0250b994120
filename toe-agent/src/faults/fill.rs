//! Volume fill: a file written into a directory of the target's filesystem view. The directory is
//! opened through `/proc/<pid>/root` with `openat2(RESOLVE_IN_ROOT)`, so `..` and symlinks
//! resolve inside the target's root and its mount namespace (a PV mounted in a container is
//! reached as the container sees it) and can never lead out of it.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Component, Path},
};

use super::FaultError;

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
    let root = CString::new(format!("/proc/{pid}/root")).expect("no NUL");
    // SAFETY: a NUL-terminated path; the returned fd is owned below.
    let rfd = unsafe {
        libc::open(
            root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if rfd < 0 {
        return Err(FaultError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: rfd is a fresh descriptor we own.
    let root = unsafe { OwnedFd::from_raw_fd(rfd) };
    let rel = CString::new(path.trim_start_matches('/')).expect("checked for NUL");
    let rel = if rel.as_bytes().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        rel
    };
    // SAFETY: open_how is plain integers; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid dirfd, NUL-terminated path, open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &raw const how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(FaultError::Refused(format!(
            "--path {path}: cannot open it as a directory inside the target ({e})"
        )));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) })
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

    #[test]
    fn directories_open_through_the_process_root() {
        assert!(open_dir(std::process::id(), "/tmp/../../etc").is_err());
        assert!(open_dir(std::process::id(), "/").is_ok());
        assert!(open_dir(std::process::id(), "/no/such/dir").is_err());
    }
}

//! Waiting without waking: a reader thread blocks in poll(2) on the descriptor it reads (a ring
//! buffer the kernel signals when a record lands) and on a stop signal, instead of waking on a
//! short timer to look at both. Every wake-up of an agent thread is a context switch on a CPU
//! some workload runs on; on a virtual machine, waking an idle vCPU costs the workload more than
//! the agent's work itself, so an idle run should wake the node as little as it can.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// A stop request a thread blocked in [`Stop::wait`] sees at once: a flag and an eventfd that
/// becomes readable when it is set.
#[derive(Debug)]
pub struct Stop {
    asked: AtomicBool,
    fd: OwnedFd,
}

impl Stop {
    /// # Errors
    /// When the kernel refuses an eventfd (out of descriptors).
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointer arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            asked: AtomicBool::new(false),
            // SAFETY: a new descriptor owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Asks the waiting thread to stop; it returns from [`Self::wait`] at once.
    pub fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte buffer, as eventfd requires. A full counter (impossible here: one
        // write per stop) would only mean it is readable already.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    #[must_use]
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// Blocks until `fd` is readable, a stop is asked, or `timeout` passes. Returns whether
    /// `fd` became readable.
    pub fn wait(&self, fd: Option<BorrowedFd<'_>>, timeout: Duration) -> bool {
        if self.asked() {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd.map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Rounded up: a wait of less than a millisecond rounded down to none would spin.
        let ms =
            libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        // SAFETY: two valid pollfd entries (poll ignores a negative fd).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        n > 0 && fds[1].revents & libc::POLLIN != 0
    }
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd as _, sync::Arc, time::Instant};

    use super::*;

    #[test]
    fn a_stop_ends_a_long_wait_at_once() {
        let stop = Arc::new(Stop::new().expect("eventfd"));
        let waiter = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let t = Instant::now();
                let readable = stop.wait(None, Duration::from_secs(30));
                (readable, t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        stop.ask();
        let (readable, waited) = waiter.join().expect("waiter");
        assert!(!readable);
        assert!(stop.asked());
        // Not a speed claim: only that the stop, not the timeout, ended the wait.
        assert!(waited < Duration::from_secs(30));
        // Once asked, a wait returns without blocking.
        assert!(!stop.wait(None, Duration::from_secs(30)));
    }

    #[test]
    fn a_readable_descriptor_ends_the_wait() {
        let stop = Stop::new().expect("eventfd");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        assert!(!stop.wait(Some(r.as_fd()), Duration::from_millis(1)));
        nix::unistd::write(&w, b"x").expect("write");
        assert!(stop.wait(Some(r.as_fd()), Duration::from_secs(30)));
    }
}

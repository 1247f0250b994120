//! Ending a kube `Controller` on shutdown, within a bound.
//!
//! kube's graceful shutdown stops taking new work and waits for the reconciles in flight, but its
//! runner is held until the controller's own reflector has listed its objects once, and the
//! shutdown also stops the watch that would finish that list: a signal that arrives before the
//! first list completes (an operator deleted right after it started, a slow API server) would
//! wait for ever. So every controller here also ends a bounded time after the signal, and the
//! wait for the first list gives way to the signal too.

use std::{future::Future, hash::Hash, time::Duration};

use futures::{
    FutureExt, Stream, StreamExt,
    future::{BoxFuture, Shared},
};
use kube::{Resource, runtime::reflector::Store};

/// How long reconciles in flight may take to finish once the signal has come; a pod is killed
/// 30 s after its SIGTERM by default.
pub const GRACE: Duration = Duration::from_secs(20);

/// One shutdown signal, for the several places that wait on it.
#[derive(Clone)]
pub struct Signal(Shared<BoxFuture<'static, ()>>);

impl Signal {
    /// SIGTERM or SIGINT (Ctrl-C), listened for from this call on. The handlers are registered
    /// here, not when something first awaits the signal: tokio only reports a signal that comes
    /// after its listener exists, and a part started late (the controllers, once this replica
    /// leads) must still see a SIGTERM that came while it waited.
    ///
    /// # Errors
    /// When a handler cannot be registered (outside a tokio runtime with signals enabled).
    pub fn from_os() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(Self::new(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }))
    }

    #[must_use]
    pub fn new(shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(shutdown.boxed().shared())
    }

    /// Resolves when the signal comes.
    pub fn fired(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        self.0.clone()
    }

    /// `stream` (a controller's results) until it ends by itself after the signal, or [`GRACE`]
    /// after the signal, whichever comes first; at once if `listed` says the controller has not
    /// listed its objects yet (it can have started no reconcile then).
    pub fn bound<S: Stream>(
        &self,
        stream: S,
        listed: impl Fn() -> bool,
    ) -> impl Stream<Item = S::Item> {
        let fired = self.fired();
        stream.take_until(async move {
            fired.await;
            if !listed() {
                return;
            }
            tokio::time::sleep(GRACE).await;
            tracing::warn!(
                grace = ?GRACE,
                "reconciles still running after the shutdown grace period; stopping anyway"
            );
        })
    }

    /// `wait` unless the signal comes first (None then, also when both are ready).
    pub async fn unless_fired<T>(&self, wait: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.fired() => None,
            r = wait => Some(r),
        }
    }
}

/// Whether `store` has its first list (a controller's runner waits for it before any reconcile).
#[must_use]
pub fn listed<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_never_ends_ends_a_grace_period_after_the_signal() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let signal = Signal::new(async move {
            let _ = rx.await;
        });
        let start = tokio::time::Instant::now();
        let stream = signal.bound(futures::stream::pending::<()>(), || true);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = tx.send(());
        });
        assert_eq!(stream.collect::<Vec<_>>().await, Vec::<()>::new());
        // Paused time: the clock moves only by the sleeps, so this is exact, not timed.
        assert_eq!(start.elapsed(), Duration::from_secs(5) + GRACE);
        sender.await.unwrap();
        // Not listed yet: nothing can be in flight, so no grace.
        let start = tokio::time::Instant::now();
        let unlisted = signal.bound(futures::stream::pending::<()>(), || false);
        assert_eq!(unlisted.collect::<Vec<_>>().await, Vec::<()>::new());
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(
            signal.unless_fired(futures::future::pending::<()>()).await,
            None
        );
        assert_eq!(signal.unless_fired(async { 7 }).await, None);
        let quiet = Signal::new(futures::future::pending());
        assert_eq!(quiet.unless_fired(async { 7 }).await, Some(7));
    }
}

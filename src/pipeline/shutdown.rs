//! The one cancellation signal of a run (mini-redis's `shutdown.rs`): fired
//! by SIGINT/SIGTERM, it tells every part to stop taking new work. It is
//! only ever "stop"; why the loop ends otherwise travels as a
//! [`StageEvent`](super::guard_stage::StageEvent).

use tokio::sync::watch;

/// A cancellation signal shared by every part of one run.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Fires the [`Shutdown`] it was created with.
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

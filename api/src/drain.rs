//! Draining: on shutdown every listener stops accepting, in-flight work finishes within a
//! deadline, then the process exits. Listeners watch a [`Watch`]; each connection holds a
//! [`Guard`] so the drainer knows when the last one is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

struct Shared {
    active: AtomicUsize,
    idle: Notify,
}

/// Starts a drain; owned by whoever handles the shutdown signal.
pub struct Drain {
    tx: watch::Sender<bool>,
    shared: Arc<Shared>,
}

/// Given to listeners and connections.
#[derive(Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

/// Held by one in-flight connection.
pub struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Drain {
            tx,
            shared: Arc::new(Shared {
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
            shared: self.shared.clone(),
        }
    }

    /// Signals every listener, then waits until no connection is left or `deadline` passes.
    /// Returns how many connections were still open at the deadline.
    pub async fn drain(self, deadline: Duration) -> usize {
        let _ = self.tx.send(true);
        let wait = async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.active.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Marks one connection in flight until the guard is dropped.
    pub fn guard(&self) -> Guard {
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        Guard(self.shared.clone())
    }
}

/// SIGTERM and SIGINT, listened for from the moment this is made, so that a signal arriving
/// while the program is busy elsewhere is not lost (tokio delivers a signal only to the
/// listeners that exist when it arrives; one made later never sees it).
pub struct Shutdown {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    pub fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Shutdown {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// `work`'s output, or `None` when SIGTERM or SIGINT comes first (`work` is then dropped).
    pub async fn or<F: std::future::Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            out = work => Some(out),
            () = self.recv() => None,
        }
    }

    /// Waits for SIGTERM or SIGINT (returns at once for one that came since the last call).
    pub async fn recv(&mut self) {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_in_flight_work_up_to_the_deadline() {
        let drain = Drain::new();
        let mut w = drain.watch();
        let guard = w.guard();
        let listener = tokio::spawn(async move {
            w.signaled().await;
        });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(guard);
        });
        let started = tokio::time::Instant::now();
        assert_eq!(drain.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        listener.await.unwrap();

        let drain = Drain::new();
        let _stuck = drain.watch().guard();
        assert_eq!(drain.drain(Duration::from_secs(1)).await, 1, "gives up at the deadline");
    }
}

//! Where the server's work runs: connections on request workers, one single-threaded
//! runtime per CPU (as nginx's worker processes), and signed check-ins on a runtime of their
//! own, so that a burst of check-ins queues behind itself and not in front of the fleet's polls.
//!
//! **Request workers.** Each accepted connection is handed to the worker with the fewest
//! open connections and lives there to its end: its reads, its parsing and its handlers run
//! on that thread, with no task moving between threads and no worker waking another. On a
//! multi-threaded runtime a fleet's trickle of polls kept the workers parking and waking
//! each other (a fifth of a core for 2,400 requests a second under `tern-bench
//! rollout-run`), and that time was taken from the polls whenever the CPUs were shared.
//!
//! **Check-ins.** A check-in costs a couple of hundred microseconds of CPU (its signature,
//! its challenge, the order's signature) and a phase opening over thousands of devices sends
//! them in thousands a second. On the request workers each poll would wait behind that
//! backlog; here the check-ins' workers and the request workers share the CPUs as the
//! operating system shares threads, and a poll is answered as soon as its connection's
//! worker runs. Every other handler but the poll runs there too (`api::router`): a
//! request worker only reads, parses and writes, so that no handler's work (storing an
//! upload's files, a large search) holds up the connections sharing its worker, and no
//! database connection is opened from a worker's reactor.
//!
//! (The poll itself is answered before the router, on the request worker:
//! `api::PollFront`.)
//!
//! Both live as long as the process (they are never dropped, so no server's end can stop
//! another's work), one worker per CPU each; where their threads cannot be started, the
//! work runs where it arrives.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// The name of the check-in workers' threads.
pub const THREAD_NAME: &str = "tern-checkin";

/// The request workers' threads are named this, then their number.
pub const REQUEST_THREAD_NAME: &str = "tern-http-";

/// Request workers, and check-in workers: one each per CPU.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            match Builder::new_multi_thread()
                .worker_threads(workers())
                .thread_name(THREAD_NAME)
                .enable_all()
                .build()
            {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::warn!("cannot start the check-in workers ({e}); check-ins run with requests");
                    None
                }
            }
        })
        .as_ref()
}

/// Start `work` on the check-in workers (every handler but the poll, and the batches of
/// check-ins' statements, run there). Once started, it runs to its end even if nobody
/// awaits its handle.
pub fn spawn<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> JoinHandle<T> {
    use tracing::Instrument;
    let handle = runtime().map_or_else(Handle::current, |rt| rt.handle().clone());
    // The request's log span (its token noted there) goes with it.
    handle.spawn(work.instrument(tracing::Span::current()))
}

/// One request worker: a single-threaded runtime on a thread of its own.
struct Worker {
    handle: Handle,
    /// Connections handed to it and not yet ended.
    open: AtomicUsize,
}

fn request_workers() -> &'static [Worker] {
    static WORKERS: OnceLock<Vec<Worker>> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let mut started = Vec::new();
        for i in 0..workers() {
            match start_worker(i) {
                Ok(handle) => started.push(Worker {
                    handle,
                    open: AtomicUsize::new(0),
                }),
                Err(e) => {
                    tracing::warn!("cannot start request worker {i} ({e}); connections are served with the listener");
                    return Vec::new();
                }
            }
        }
        started
    })
}

fn start_worker(i: usize) -> std::io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{REQUEST_THREAD_NAME}{i}"))
        .spawn(move || match Builder::new_current_thread().enable_all().build() {
            Ok(rt) => {
                let _ = tx.send(Ok(rt.handle().clone()));
                // A current-thread runtime runs its tasks while it is blocked on.
                rt.block_on(std::future::pending::<()>());
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the worker's thread ended before its runtime started"))?
}

/// Counts a connection on its worker until it ends.
struct Open(&'static AtomicUsize);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run a connection's work on the request worker with the fewest open connections (or
/// where it arrives, if there are none). `work` is made on that worker, so the I/O it opens
/// (a socket taken from the listener) is registered with that worker's reactor.
pub fn connection<F, W>(work: W)
where
    W: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let Some(worker) = request_workers().iter().min_by_key(|w| w.open.load(Ordering::Relaxed)) else {
        tokio::spawn(async move { work().await });
        return;
    };
    worker.open.fetch_add(1, Ordering::Relaxed);
    let open = Open(&worker.open);
    worker.handle.spawn(async move {
        let _open = open;
        work().await
    });
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn work_runs_on_the_checkin_workers() {
        let name = super::spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some(super::THREAD_NAME));
        let panicked: Result<(), String> = super::spawn(async { panic!("boom") }).await.map_err(|e| e.to_string());
        assert!(panicked.unwrap_err().contains("panic"));
    }

    #[tokio::test]
    async fn connections_spread_over_the_request_workers() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (hold, held) = tokio::sync::watch::channel(());
        let n = super::workers();
        for _ in 0..2 * n {
            let tx = tx.clone();
            let mut held = held.clone();
            super::connection(move || async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                // Stay open, so the next connection goes to the least loaded worker.
                let _ = held.changed().await;
            });
        }
        drop(tx);
        let mut names = std::collections::BTreeMap::new();
        for _ in 0..2 * n {
            let name = rx.recv().await.flatten().unwrap_or_default();
            *names.entry(name).or_insert(0) += 1;
        }
        assert_eq!(names.len(), n, "{names:?}");
        assert!(
            names
                .iter()
                .all(|(name, count)| name.starts_with(super::REQUEST_THREAD_NAME) && *count == 2),
            "{names:?}"
        );
        drop(hold);
    }
}

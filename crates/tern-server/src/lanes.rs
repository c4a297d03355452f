//! Where a signed check-in's work runs: a runtime of its own, so that a burst of check-ins
//! queues behind itself and not in front of the fleet's polls.
//!
//! A check-in costs a couple of hundred microseconds of CPU (its signature, its
//! challenge, the order's signature) and a phase opening over thousands of devices sends
//! them in thousands a second. On the runtime that reads requests, each poll would wait
//! behind that backlog; here the check-ins' workers and the request workers share the
//! CPUs as the operating system shares threads, and a poll is answered as soon as its
//! connection's worker runs. The runtime lives as long as the process (it is never
//! dropped, so no server's end can stop another's check-ins), one worker per CPU; where
//! its threads cannot be started, check-ins run where they arrive.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// The name of the check-in workers' threads.
pub const THREAD_NAME: &str = "tern-checkin";

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            match Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(THREAD_NAME)
                .enable_all()
                .build()
            {
                Ok(rt) => Some(rt),
                Err(e) => {
                    eprintln!("tern server: cannot start the check-in workers ({e}); check-ins run with requests");
                    None
                }
            }
        })
        .as_ref()
}

/// Run `work` on the check-in workers and wait for its result; `Err` only if it panicked.
/// Once started, it runs to its end even if the caller stops waiting.
pub async fn checkin<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
    spawn(work).await.map_err(|e| e.to_string())
}

/// Start `work` on the check-in workers (the batches of check-ins' statements run there).
pub fn spawn<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> JoinHandle<T> {
    let handle = runtime().map_or_else(Handle::current, |rt| rt.handle().clone());
    handle.spawn(work)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn work_runs_on_the_checkin_workers() {
        let name = super::checkin(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some(super::THREAD_NAME));
        let panicked: Result<(), String> = super::checkin(async { panic!("boom") }).await;
        assert!(panicked.unwrap_err().contains("panic"));
    }
}

//! Group commit for the hot path: requests that arrive while the database is busy with the
//! previous batch are answered together by one statement (one round trip, one commit, one
//! fsync). Nothing waits on a timer: a request that finds the database idle is sent at once,
//! alone, so a quiet server answers as fast as before, and a busy one amortises each
//! statement's fixed cost over every request queued behind it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Requests queued for one batcher beyond the batch being run (back-pressure: callers wait
/// to enqueue once this many are waiting).
const QUEUE: usize = 4096;

/// What a batch statement failed with, given to every request in the batch.
pub type BatchError = Arc<sqlx::Error>;

type Waiter<Q, A> = (Q, oneshot::Sender<Result<A, BatchError>>);

/// A queue in front of one batch statement: [`Batcher::call`] enqueues a request and waits
/// for its answer.
pub struct Batcher<Q, A> {
    tx: mpsc::Sender<Waiter<Q, A>>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Start the task that runs batches of at most `max` requests, at most `parallel` at a
    /// time. `run` answers a batch in order (one answer per request); the task ends when the
    /// batcher is dropped. Must be called inside a Tokio runtime.
    pub fn start<F, Fut>(max: usize, parallel: usize, run: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<A>, sqlx::Error>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Waiter<Q, A>>(QUEUE);
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            // A batch is taken only when it can run: requests queue meanwhile, and the next
            // batch is everything that arrived while the others ran.
            while let Ok(slot) = slots.clone().acquire_owned().await {
                let mut batch = Vec::with_capacity(max);
                if rx.recv_many(&mut batch, max.max(1)).await == 0 {
                    break;
                }
                let (queries, waiters): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
                let answers = run(queries);
                tokio::spawn(async move {
                    answer(waiters, answers.await);
                    drop(slot);
                });
            }
        });
        Batcher { tx }
    }

    /// Enqueue `q` and wait for its answer.
    pub async fn call(&self, q: Q) -> Result<A, BatchError> {
        let (tx, rx) = oneshot::channel();
        let gone = || Arc::new(sqlx::Error::PoolClosed);
        self.tx.send((q, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn answer<A>(waiters: Vec<oneshot::Sender<Result<A, BatchError>>>, out: Result<Vec<A>, sqlx::Error>) {
    let n = waiters.len();
    let e = match out {
        Ok(answers) if answers.len() == n => {
            for (a, w) in answers.into_iter().zip(waiters) {
                let _ = w.send(Ok(a));
            }
            return;
        }
        Ok(answers) => sqlx::Error::Protocol(format!("a batch of {n} got {} answers", answers.len())),
        Err(e) => e,
    };
    let e = Arc::new(e);
    for w in waiters {
        let _ = w.send(Err(e.clone()));
    }
}

/// The placeholders `($k+1, …, $k+width)` of each of `rows` rows, comma-separated, each
/// wrapped by `cast(i)` for its column `i`: what a batch statement's `VALUES` or `IN` lists.
pub fn placeholders(rows: usize, width: usize, cast: impl Fn(usize, usize) -> String) -> String {
    let mut out = String::with_capacity(rows * width * 24);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&cast(c, r * width + c + 1));
        }
        out.push(')');
    }
    out
}

/// The smallest of 1, 2, 4, … 2^k that holds `n`: batches are padded to these sizes so that
/// each connection prepares a handful of statements, not one per batch size.
pub fn padded(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_and_columns() {
        assert_eq!(placeholders(2, 2, |_, n| format!("${n}")), "($1, $2), ($3, $4)");
        assert_eq!(
            placeholders(1, 2, |c, n| if c == 1 {
                format!("CAST(${n} AS BIGINT)")
            } else {
                format!("${n}")
            }),
            "($1, CAST($2 AS BIGINT))"
        );
        assert_eq!(
            (padded(0), padded(1), padded(3), padded(64), padded(65)),
            (1, 1, 4, 64, 128)
        );
    }

    #[tokio::test]
    async fn queued_requests_share_a_batch_and_get_their_own_answers() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b = Arc::new(Batcher::start(8, 1, move |qs: Vec<u32>| {
            seen.lock().unwrap().push(qs.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(qs.into_iter().map(|q| q * 10).collect())
            }
        }));
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
            })
            .collect();
        for c in calls {
            let (i, a) = c.await.unwrap();
            assert_eq!(a, i * 10);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(
            sizes.len() < 20,
            "requests queued behind a batch were not batched: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_requests() {
        let b = Batcher::start(4, 2, |_: Vec<u32>| async {
            Err::<Vec<u32>, _>(sqlx::Error::RowNotFound)
        });
        assert!(matches!(*b.call(1).await.unwrap_err(), sqlx::Error::RowNotFound));
        let short = Batcher::start(4, 2, |_: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        assert!(short.call(1).await.unwrap_err().to_string().contains("1 got 0 answers"));
    }
}

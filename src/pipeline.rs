//! Prefetch pipeline: one worker thread runs jobs in submission order ahead of their consumer,
//! through a bounded queue, so image preparation overlaps the model (training batches, the view
//! cache, embedding a catalogue).
//!
//! The worker may use rayon inside a job (decoding a batch in parallel); the consumer keeps the
//! ONNX Runtime session. Results come back in the order the jobs went in, so a pipelined loop
//! computes exactly what the serial loop would: determinism lives in the jobs (each carries its
//! own seeds), never in timing. Dropping a [`Prefetch`] closes the queue and joins the worker.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// A worker thread applying `f` to each submitted job, at most `depth` results ahead.
pub struct Prefetch<J: Send + 'static, T: Send + 'static> {
    jobs: Option<SyncSender<J>>,
    results: Receiver<T>,
    worker: Option<JoinHandle<()>>,
    pending: usize,
}

impl<J: Send + 'static, T: Send + 'static> Prefetch<J, T> {
    /// Starts the worker. `depth` bounds both the queued jobs and the finished results waiting
    /// for the consumer (memory: about `2 * depth` results at most).
    pub fn new(name: &str, depth: usize, mut f: impl FnMut(J) -> T + Send + 'static) -> Self {
        let depth = depth.max(1);
        let (jobs, job_rx) = sync_channel::<J>(depth);
        let (result_tx, results) = sync_channel::<T>(depth);
        let worker = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for job in job_rx {
                    if result_tx.send(f(job)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning a prefetch thread");
        Prefetch { jobs: Some(jobs), results, worker: Some(worker), pending: 0 }
    }

    /// Queues a job; blocks while `depth` jobs are already queued.
    ///
    /// # Panics
    /// If the worker panicked (the panic is carried over to this thread).
    pub fn submit(&mut self, job: J) {
        if self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok()) {
            self.pending += 1;
        } else {
            self.worker_failed();
        }
    }

    /// Jobs submitted whose results have not been taken yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The result of the oldest job not taken yet, waiting for it; `None` when nothing is pending.
    ///
    /// # Panics
    /// If the worker panicked (the panic is carried over to this thread).
    pub fn next(&mut self) -> Option<T> {
        if self.pending == 0 {
            return None;
        }
        match self.results.recv() {
            Ok(t) => {
                self.pending -= 1;
                Some(t)
            }
            Err(_) => self.worker_failed(),
        }
    }

    /// The worker hung up: carry its panic over.
    fn worker_failed(&mut self) -> ! {
        self.jobs = None;
        match self.worker.take().map(JoinHandle::join) {
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            _ => panic!("the prefetch worker stopped without an answer"),
        }
    }
}

impl<J: Send + 'static, T: Send + 'static> Drop for Prefetch<J, T> {
    fn drop(&mut self) {
        // Closing both queues stops the worker after its current job: a send into the dropped
        // result queue fails, and so does the wait for the next job.
        self.jobs = None;
        drop(std::mem::replace(&mut self.results, sync_channel(1).1));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_and_equal_the_serial_loop() {
        let f = |x: u64| (0..x).map(|i| i * i % 7).sum::<u64>();
        let mut p = Prefetch::new("test", 2, f);
        let mut got = Vec::new();
        for x in 0..50u64 {
            p.submit(x * 1000);
            if p.pending() > 2 {
                got.push(p.next().unwrap());
            }
        }
        while let Some(v) = p.next() {
            got.push(v);
        }
        let want: Vec<u64> = (0..50u64).map(|x| f(x * 1000)).collect();
        assert_eq!(got, want);
        assert_eq!(p.next(), None);
    }

    #[test]
    fn a_worker_that_runs_ahead_is_bounded_and_dropping_it_does_not_hang() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let mut p = Prefetch::new("test", 1, move |x: usize| {
            d.fetch_add(1, Ordering::SeqCst);
            x
        });
        p.submit(1);
        p.submit(2);
        p.submit(3); // blocks until the worker took job 1
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Job 1's result fills the result queue, job 2 is in the worker's hands, job 3 waits.
        assert!(done.load(Ordering::SeqCst) <= 2, "{} jobs ran", done.load(Ordering::SeqCst));
        assert_eq!(p.next(), Some(1));
        drop(p);
    }

    #[test]
    #[should_panic(expected = "job 3 failed")]
    fn a_panicking_job_reaches_the_consumer() {
        let mut p = Prefetch::new("test", 2, |x: u32| {
            assert!(x != 3, "job {x} failed");
            x
        });
        for x in 0..5 {
            p.submit(x);
        }
        for _ in 0..5 {
            p.next();
        }
    }
}

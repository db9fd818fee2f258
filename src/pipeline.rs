//! Prefetch pipeline: one worker thread prepares jobs in order ahead of their consumer, through a
//! bounded queue, so image preparation overlaps the model — training batches, the view cache,
//! embedding a catalogue (`index`, `eval`) all go through [`pipelined`].
//!
//! The worker may use rayon inside a job (decoding a chunk in parallel); the consumer keeps the
//! ONNX Runtime session on the calling thread. Results reach the consumer in job order, so a
//! pipelined loop computes exactly what the serial loop `for j in jobs { consume(prepare(j)) }`
//! would: determinism lives in the jobs (each carries its own seeds), never in timing.

use std::sync::mpsc::sync_channel;

/// Runs `prepare` over `jobs` on a worker thread, at most `depth` finished results ahead, and
/// `consume` over the results on the calling thread, in job order. Stops at the first error
/// `consume` returns (the worker is told to stop and joined) and returns it. `depth` 0 runs the
/// serial loop on the calling thread instead (no overlap; for comparisons).
///
/// # Panics
/// A panic in `prepare` (or in the job iterator) is carried over to the caller.
pub fn pipelined<J, T, E>(
    depth: usize,
    jobs: impl Iterator<Item = J> + Send,
    mut prepare: impl FnMut(J) -> T + Send,
    mut consume: impl FnMut(T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
{
    if depth == 0 {
        for job in jobs {
            consume(prepare(job))?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<T>(depth);
        let worker = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn_scoped(s, move || {
                for job in jobs {
                    if tx.send(prepare(job)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        let mut result = Ok(());
        for t in rx.iter() {
            if let Err(e) = consume(t) {
                result = Err(e);
                break;
            }
        }
        // A worker blocked on a full queue sees the receiver gone and stops.
        drop(rx);
        match worker.join() {
            Ok(()) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn work(x: u64) -> u64 {
        (0..x).map(|i| i * i % 7).sum()
    }

    #[test]
    fn results_come_back_in_order_and_equal_the_serial_loop() {
        let mut got = Vec::new();
        pipelined(2, (0..50u64).map(|x| x * 1000), work, |v| {
            got.push(v);
            Ok::<(), ()>(())
        })
        .unwrap();
        let want: Vec<u64> = (0..50u64).map(|x| work(x * 1000)).collect();
        assert_eq!(got, want);
        let mut serial = Vec::new();
        pipelined(0, (0..50u64).map(|x| x * 1000), work, |v| {
            serial.push(v);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(serial, want);
    }

    #[test]
    fn the_worker_runs_at_most_depth_ahead_and_stops_on_an_error() {
        let prepared = AtomicUsize::new(0);
        let mut seen = 0;
        let r = pipelined(
            2,
            0..1000usize,
            |x| {
                prepared.fetch_add(1, Ordering::SeqCst);
                x
            },
            |x| {
                seen += 1;
                if x == 5 { Err(format!("stop at {x}")) } else { Ok(()) }
            },
        );
        assert_eq!(r, Err("stop at 5".to_string()));
        assert_eq!(seen, 6);
        // Six consumed, at most two queued and one in the worker's hands when it noticed.
        let p = prepared.load(Ordering::SeqCst);
        assert!((6..=9).contains(&p), "{p} jobs prepared");
    }

    #[test]
    #[should_panic(expected = "job 3 failed")]
    fn a_panicking_job_reaches_the_caller() {
        let _ = pipelined(
            2,
            0..5u32,
            |x| {
                assert!(x != 3, "job {x} failed");
                x
            },
            |_| Ok::<(), ()>(()),
        );
    }
}

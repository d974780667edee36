//! A small fork-join thread pool tuned for decode, where the gap between two parallel ops is
//! microseconds: idle workers spin on a generation counter for a bounded time (waking from a
//! futex costs tens of µs), then yield, then park, so an idle engine or a machine busy with
//! other work does not keep burning the cores.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it starts yielding, then parking.
const SPIN: Duration = Duration::from_micros(100);
const YIELD: Duration = Duration::from_micros(400);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    generation: AtomicU64,
    /// The current job; written by the caller before it bumps `generation`.
    job: UnsafeCell<Option<*const Job>>,
    /// Job indices 1..n not yet claimed by a worker; index = n - (value before claiming).
    unclaimed: AtomicUsize,
    /// Claimed indices whose worker has not finished.
    remaining: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `run_lock`, before a Release bump of
// `generation`, and read by workers after the matching Acquire load; it points to a closure
// that outlives the job because `run` waits for every worker before returning.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// `n_threads` includes the caller thread; 1 (or 0) means no workers.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            unclaimed: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            panic: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tern-worker-{i}"))
                    .spawn(move || worker(s))
                    .expect("failed to spawn worker thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs f(index, n_threads) for every index in 0..n_threads and returns when all are done;
    /// the caller runs index 0, and each worker that wakes up in time claims one of the others.
    /// Indices no worker has claimed by the time the caller is done with its own are run by
    /// the caller, so a worker descheduled by other load on the machine does not stall the
    /// job. A panic in any of them is re-raised here after all have finished. If the pool is
    /// already busy (a nested call from inside `f`, or another thread's call), every index runs
    /// on the calling thread, one after another.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        let guard = match self.run_lock.try_lock() {
            Ok(g) if n > 1 => g,
            _ => {
                for i in 0..n {
                    f(i, n);
                }
                return;
            }
        };
        let s = &*self.shared;
        let job: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: erases the closure's lifetime; we do not return before every worker is done
        // with it (the wait below runs even if our own part panics).
        let job: *const Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job) };
        unsafe { *s.job.get() = Some(job) };
        s.remaining.store(n - 1, Ordering::Relaxed);
        s.unclaimed.store(n - 1, Ordering::Release);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mut mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        // Close the job to late workers and run what they did not claim.
        let left = s.unclaimed.swap(0, Ordering::AcqRel);
        s.remaining.fetch_sub(left, Ordering::AcqRel);
        for i in n - left..n {
            if mine.is_ok() {
                mine = catch_unwind(AssertUnwindSafe(|| f(i, n)));
            }
        }
        wait_until(|| s.remaining.load(Ordering::Acquire) == 0);
        unsafe { *s.job.get() = None };
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(guard);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

/// Spins, then yields, until `done()`; the caller waits only for the rest of a running job.
fn wait_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    let mut i = 0u32;
    while !done() {
        i = i.wrapping_add(1);
        if i.is_multiple_of(64) && start.elapsed() > SPIN {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin, then yield, then park on the condvar.
        let start = Instant::now();
        let mut i = 0u32;
        let gen = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen || s.shutdown.load(Ordering::Acquire) {
                break g;
            }
            i = i.wrapping_add(1);
            if !i.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let waited = start.elapsed();
            if waited < SPIN {
                std::hint::spin_loop();
            } else if waited < SPIN + YIELD {
                std::thread::yield_now();
            } else {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        };
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = gen;
        let claimed = s.unclaimed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(1));
        let Ok(before) = claimed else {
            continue; // The caller already ran the rest of this job.
        };
        let index = s.n_threads - before;
        // SAFETY: see `Shared`; the job stays valid until we decrement `remaining`.
        let job = unsafe { (*s.job.get()).expect("job set before generation bump") };
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index, s.n_threads) }));
        if let Err(p) = r {
            let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_index_once() {
        for n in 1..=4 {
            let pool = ThreadPool::new(n);
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|i, nt| {
                    assert_eq!(nt, n);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn wakes_after_parking() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(Duration::from_millis(5));
        let c = AtomicUsize::new(0);
        pool.run(|_, _| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(c.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn worker_panic_propagates_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 0 {
                    panic!("boom0");
                }
            })
        }));
        assert!(r.is_err());
        let c = AtomicUsize::new(0);
        pool.run(|_, _| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(c.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn nested_run_does_not_deadlock() {
        let pool = ThreadPool::new(2);
        let c = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|_, _| {
                c.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(c.load(Ordering::Relaxed), 4);
    }
}

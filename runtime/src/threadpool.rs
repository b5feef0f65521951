//! A fixed pool of worker threads that runs one data-parallel job at a time.
//!
//! Kernels call [`ThreadPool::run`] with a closure `f(thread_index, n_threads)`; every thread
//! (the caller included, as index 0) runs it once and `run` returns when all have finished.
//! Work is split by the closure itself (usually by rows, see [`split_range`]), so a job
//! allocates nothing.
//!
//! The workers are persistent: between jobs they spin briefly (a decode step issues hundreds of
//! small jobs back to back, so waking must be cheap), then park. Dispatch is an atomic epoch
//! bump; completion is an atomic countdown.
//!
//! Policy for misuse and failure:
//! - **Nested or concurrent `run`** (a job calling `run` on its own pool, or two threads sharing
//!   one pool): the pool is busy, so the inner/second call runs its job inline on the calling
//!   thread as `f(0, 1)`. Results stay correct because jobs split work by the `n` they are given;
//!   it is just not parallel. No deadlock.
//! - **A panicking job**: every thread's part is caught, `run` waits until all threads are done
//!   with the job (it borrows the caller's stack) and then resumes the first panic on the caller.
//!   The pool stays usable afterwards.
//! - **Drop** signals shutdown, wakes and joins every worker.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// The job as the workers see it: a lifetime-erased pointer to the caller's closure.
type JobPtr = *const (dyn Fn(usize, usize) + Sync);

/// State shared by the caller and the workers.
struct Shared {
    /// Incremented once per job (and once at shutdown); workers wait for it to change.
    epoch: AtomicUsize,
    /// Workers still running the current job.
    remaining: AtomicUsize,
    /// Workers that are parked (or about to park).
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    /// Set while a `run` owns the pool.
    busy: AtomicBool,
    /// The current job; written only by the `run` that owns `busy`, before the epoch bump.
    job: UnsafeCell<Option<JobPtr>>,
    /// The first panic payload of the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the owner of `busy` while no worker reads it (all workers
// have finished the previous job: `remaining == 0`), and published to workers by the Release
// epoch bump they Acquire; the closure it points to is `Sync`. All other fields are atomics or a
// mutex.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced while its `run` call is alive.
unsafe impl Send for Shared {}

/// A pool of `n_threads - 1` workers plus the calling thread. `Send` and `Sync`; see the
/// module documentation for the nested/concurrent-use policy.
pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    workers: Vec<(Thread, Option<JoinHandle<()>>)>,
}

impl ThreadPool {
    /// A pool that runs jobs on `n_threads` threads (at least 1). If the OS refuses to spawn a
    /// worker, the pool runs on the threads it got.
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            panic: Mutex::new(None),
        });
        let wanted = n_threads.max(1);
        let mut workers = Vec::with_capacity(wanted - 1);
        for index in 1..wanted {
            let s = Arc::clone(&shared);
            let n = wanted;
            let spawned = std::thread::Builder::new()
                .name(format!("peftrt-worker-{index}"))
                .spawn(move || worker_loop(&s, index, n));
            match spawned {
                Ok(h) => workers.push((h.thread().clone(), Some(h))),
                Err(_) => break,
            }
        }
        // If some spawn failed, the already-started workers were told `n = wanted`; restart
        // with the number we actually have so indices stay dense.
        if workers.len() + 1 != wanted {
            let got = workers.len() + 1;
            drop(ThreadPool {
                n_threads: wanted,
                shared,
                workers,
            });
            return ThreadPool::new(got);
        }
        ThreadPool {
            n_threads: wanted,
            shared,
            workers,
        }
    }

    /// Number of threads a job runs on, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(i, n)` once on each of the `n` threads, `i` in `0..n`, and waits for all.
    ///
    /// If any part panics, the first panic is resumed here after every thread has finished.
    /// A nested or concurrent call runs `f(0, 1)` inline (see the module documentation).
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let s = &*self.shared;
        if s.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            f(0, 1);
            return;
        }
        let job: &(dyn Fn(usize, usize) + Sync) = &f;
        // SAFETY: the lifetime is erased only to store the pointer; workers dereference it
        // only between the epoch bump below and their `remaining` decrement, and this function
        // does not return (or unwind) before `remaining` reaches zero, so `f` outlives every use.
        let job: JobPtr =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), JobPtr>(job) };
        // SAFETY: we own `busy` and the previous job finished (`remaining == 0`), so no worker
        // reads `job` now.
        unsafe { *s.job.get() = Some(job) };
        s.remaining.store(n - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            self.workers.iter().for_each(|(t, _)| t.unpark());
        }

        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));

        let start = Instant::now();
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) != 0 {
            if spins < 1 << 12 || start.elapsed() < SPIN_BEFORE_PARK {
                std::hint::spin_loop();
                spins = spins.saturating_add(1);
            } else {
                // A worker was descheduled: give it the core.
                std::thread::yield_now();
            }
        }
        // SAFETY: all workers are done with the job; clear the dangling pointer.
        unsafe { *s.job.get() = None };
        let theirs = s.panic.lock().map(|mut p| p.take()).unwrap_or(None);
        s.busy.store(false, Ordering::Release);
        match (mine, theirs) {
            (Err(p), _) | (Ok(()), Some(p)) => resume_unwind(p),
            (Ok(()), None) => {}
        }
    }
}

fn worker_loop(s: &Shared, index: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if spins < 1 << 10 || start.elapsed() < SPIN_BEFORE_PARK {
                std::hint::spin_loop();
                spins = spins.saturating_add(1);
            } else {
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                // Re-check after announcing: either `run` sees `sleepers > 0` and unparks us,
                // or we see its epoch bump here.
                if s.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the Acquire load of the new epoch synchronises with `run`'s write of `job`;
        // the job stays valid until we decrement `remaining`.
        let job = unsafe { *s.job.get() };
        if let Some(job) = job {
            // SAFETY: see above; the closure is `Sync`, so calling it from here is allowed.
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index, n) }));
            if let Err(p) = r {
                if let Ok(mut slot) = s.panic.lock() {
                    slot.get_or_insert(p);
                }
            }
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::Release);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (t, h) in &mut self.workers {
            t.unpark();
            if let Some(h) = h.take() {
                let _ = h.join();
            }
        }
    }
}

/// The range of `0..len` that thread `i` of `n` owns, in chunks aligned to `align` items.
pub fn split_range(len: usize, i: usize, n: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let chunks = len.div_ceil(align);
    let per = chunks / n;
    let extra = chunks % n;
    let start_chunk = i * per + i.min(extra);
    let end_chunk = start_chunk + per + usize::from(i < extra);
    (start_chunk * align).min(len)..(end_chunk * align).min(len)
}

/// A raw pointer that threads may share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: users only write disjoint ranges (enforced by `split_range`) while the owner waits in `run`.
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> Self {
        SharedMut(s.as_mut_ptr())
    }
    /// The raw pointer (methods, unlike the field, keep closures capturing the `Sync` wrapper).
    pub fn ptr(&self) -> *mut T {
        self.0
    }
    /// # Safety
    /// `range` must lie inside the buffer this pointer came from, and no other thread may
    /// access that range while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn split_range_covers_everything_once() {
        for len in [0, 1, 7, 64, 100, 1000] {
            for n in 1..5 {
                for align in [1, 4, 16] {
                    let mut covered = vec![0u8; len];
                    for i in 0..n {
                        for j in split_range(len, i, n, align) {
                            covered[j] += 1;
                        }
                    }
                    assert!(
                        covered.iter().all(|&c| c == 1),
                        "len {len} n {n} align {align}"
                    );
                }
            }
        }
    }

    #[test]
    fn run_calls_every_thread_once() {
        let pool = ThreadPool::new(3);
        let hits = AtomicUsize::new(0);
        pool.run(|i, n| {
            assert!(i < n);
            hits.fetch_add(1 << (8 * i), Ordering::SeqCst);
        });
        assert_eq!(hits.into_inner(), 0x010101);
    }

    #[test]
    fn many_consecutive_jobs() {
        for threads in [1, 2, 4] {
            let pool = ThreadPool::new(threads);
            let total = AtomicU64::new(0);
            for job in 0..2_000u64 {
                pool.run(|i, n| {
                    assert_eq!(n, threads);
                    total.fetch_add(job * 8 + i as u64, Ordering::Relaxed);
                });
                // Every job finished before `run` returned.
                let t = threads as u64;
                let want = (0..=job).map(|j| j * 8 * t + t * (t - 1) / 2).sum::<u64>();
                assert_eq!(total.load(Ordering::Relaxed), want);
            }
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2);
        for _ in 0..3 {
            std::thread::sleep(SPIN_BEFORE_PARK * 5);
            let hits = AtomicUsize::new(0);
            pool.run(|_, _| {
                hits.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(hits.into_inner(), 2);
        }
    }

    #[test]
    fn writes_disjoint_rows() {
        let pool = ThreadPool::new(3);
        let mut buf = vec![0usize; 1001];
        let out = SharedMut::new(&mut buf);
        pool.run(|i, n| {
            let r = split_range(1001, i, n, 16);
            // SAFETY: ranges from `split_range` are disjoint and inside the buffer.
            let s = unsafe { out.slice(r.clone()) };
            for (v, j) in s.iter_mut().zip(r) {
                *v = j + 1;
            }
        });
        assert!(buf.iter().enumerate().all(|(j, &v)| v == j + 1));
    }

    #[test]
    fn nested_run_executes_inline() {
        let pool = ThreadPool::new(2);
        let inner_calls = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|i, n| {
                assert_eq!((i, n), (0, 1));
                inner_calls.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(inner_calls.into_inner(), 2);
    }

    #[test]
    fn panic_propagates_and_pool_survives() {
        for bad in [0, 1] {
            let pool = ThreadPool::new(2);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(|i, _| {
                    if i == bad {
                        panic!("job part {i} failed");
                    }
                })
            }));
            assert!(r.is_err(), "panic in part {bad} must reach the caller");
            let hits = AtomicUsize::new(0);
            pool.run(|_, _| {
                hits.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(hits.into_inner(), 2);
        }
    }

    #[test]
    fn pool_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ThreadPool>();
    }
}

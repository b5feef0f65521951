//! A fixed pool of worker threads that runs one data-parallel job at a time.
//!
//! Kernels call [`ThreadPool::run`] with a closure `f(thread_index, n_threads)`; every thread
//! (the caller included, as index 0) runs it once and `run` returns when all have finished.
//! Work is split by the closure itself (usually by rows), so a job allocates nothing.

/// A pool of `n_threads - 1` workers plus the calling thread.
pub struct ThreadPool {
    n_threads: usize,
}

impl ThreadPool {
    /// A pool that runs jobs on `n_threads` threads (at least 1).
    pub fn new(n_threads: usize) -> Self {
        ThreadPool { n_threads: n_threads.max(1) }
    }

    /// Number of threads a job runs on, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(i, n)` once on each of the `n` threads, `i` in `0..n`, and waits for all.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        std::thread::scope(|s| {
            for i in 1..n {
                let f = &f;
                s.spawn(move || f(i, n));
            }
            f(0, n);
        });
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
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> Self {
        SharedMut(s.as_mut_ptr())
    }
    /// # Safety
    /// `range` must lie inside the buffer this pointer came from, and no other thread may
    /// access that range while the returned slice lives.
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    assert!(covered.iter().all(|&c| c == 1), "len {len} n {n} align {align}");
                }
            }
        }
    }

    #[test]
    fn run_calls_every_thread_once() {
        let pool = ThreadPool::new(3);
        let hits = std::sync::atomic::AtomicUsize::new(0);
        pool.run(|i, n| {
            assert!(i < n);
            hits.fetch_add(1 << (8 * i), std::sync::atomic::Ordering::SeqCst);
        });
        assert_eq!(hits.into_inner(), 0x010101);
    }
}

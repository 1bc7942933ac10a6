//! How the crate runs work in parallel.
//!
//! There is deliberately no persistent pool: each call splits its range into contiguous chunks
//! and runs them on scoped threads that are joined before it returns. Nothing outlives a call,
//! so a `fork()` (multiprocessing, DataLoader workers) can never inherit a pool whose threads
//! vanished in the child, and an idle process holds no threads. Spawning costs ~10 µs a thread,
//! negligible next to the >= 64k-element chunks we hand each one.

use std::ops::Range;

/// Below this many elements per thread, spawning is not worth it.
pub const MIN_ELEMS_PER_THREAD: usize = 64 * 1024;

/// 0 means "all cores".
pub fn resolve(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Split `0..n` into at most `threads` contiguous ranges, each at least
/// `MIN_ELEMS_PER_THREAD` long (except when there is only one), with every boundary a
/// multiple of `align` so chunks line up with the kernels' blocks.
pub fn chunk_ranges(n: usize, threads: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let threads = threads.max(1).min(n / MIN_ELEMS_PER_THREAD).max(1);
    let per = n.div_ceil(threads).div_ceil(align) * align;
    let mut out = Vec::with_capacity(threads);
    let mut start = 0;
    while start < n {
        let end = (start + per).min(n);
        out.push(start..end);
        start = end;
    }
    if out.is_empty() {
        out.push(0..0);
    }
    out
}

/// Run `f` on every task, the first on the calling thread and the rest on scoped threads.
pub fn run_all<T: Send, F: Fn(T) + Sync>(tasks: Vec<T>, f: F) {
    let mut tasks = tasks.into_iter();
    let Some(first) = tasks.next() else { return };
    std::thread::scope(|s| {
        let f = &f;
        for t in tasks {
            s.spawn(move || f(t));
        }
        f(first);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn resolve_defaults_to_cores() {
        assert_eq!(resolve(3), 3);
        assert!(resolve(0) >= 1);
    }

    #[test]
    fn small_inputs_stay_single() {
        assert_eq!(chunk_ranges(0, 8, 4096), vec![0..0]);
        assert_eq!(chunk_ranges(1000, 8, 4096), vec![0..1000]);
        assert_eq!(chunk_ranges(MIN_ELEMS_PER_THREAD * 2 - 1, 8, 1).len(), 1);
    }

    #[test]
    fn chunks_cover_and_align() {
        for &(n, t) in &[
            (1_000_003usize, 4usize),
            (200_000, 3),
            (10_000_000, 7),
            (131_072, 2),
        ] {
            let r = chunk_ranges(n, t, 4096);
            assert!(r.len() <= t);
            assert_eq!(r[0].start, 0);
            assert_eq!(r.last().unwrap().end, n);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % 4096, 0);
            }
        }
    }

    #[test]
    fn run_all_runs_everything() {
        let sum = AtomicUsize::new(0);
        run_all((1..=10).collect(), |x: usize| {
            sum.fetch_add(x, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 55);
        run_all(Vec::<usize>::new(), |_| unreachable!());
    }
}

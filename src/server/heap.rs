//! The process's heap: glibc malloc tuned for a proxy at start, and freed heap given back to
//! the kernel when a burst of requests is over. The binary calls both; the library never
//! does on its own, so tests and embedders keep their allocator as it is.

/// glibc malloc, tuned for a proxy that moves buffers between threads:
/// - each thread that allocates gets its own arena (up to 8 per core), and each keeps what it
///   freed: buffers allocated on one thread and freed on another only raise the peak RSS, and
///   two arenas are enough for two allocating pools;
/// - by default, freed memory above 128 KiB at the top of a heap goes back to the kernel, and
///   buffers of 128 KiB or more get their own mmap: the upstream client's receive buffers
///   then cost a fresh mmap and a page fault per page, every time. A fixed 4 MiB mmap
///   threshold keeps them in the heap (cold 200 MiB GETs 0.34 -> 0.26 s). The trim
///   threshold decides how much freed heap stays mapped: 128 KiB made cold GETs 20 % slower
///   again, 8 MiB cost 3-5 MiB of peak RSS with 50 clients on one cold blob, 1 MiB cost
///   neither (measured in docs/BENCHMARKS.md).
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Gives freed heap back to the kernel once a burst of requests is over.
///
/// glibc returns memory only from the top of a heap (and `M_TRIM_THRESHOLD` only on `free`),
/// so after a burst of a hundred clients the arenas keep ~15 MiB of which under 1 MiB is in
/// use: the next burst's peak starts from there. `malloc_trim(0)` also releases the free
/// pages inside the heaps. It is run when a burst is over (the first quiet second after
/// requests started or ended), never mid-burst, and takes well under a few milliseconds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub async fn trim_when_settled() {
    use super::activity::{Settle, events};
    let mut settle = Settle::new(30);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if settle.tick(events()) {
            let trimmed = tokio::task::spawn_blocking(|| {
                let started = std::time::Instant::now();
                // SAFETY: malloc_trim only releases free memory; any thread may call it.
                unsafe { libc::malloc_trim(0) };
                started.elapsed()
            })
            .await;
            if let Ok(elapsed) = trimmed {
                tracing::debug!(?elapsed, "gave freed heap back to the kernel");
            }
        }
    }
}

//! The NBD server's disk I/O threads.
//!
//! Every `pread` that has to wait for the disk, and every `pwrite`, `fdatasync`, catalog
//! read and overlay open or close of the NBD server runs here (a READ whose bytes are in the
//! page cache is a copy, done on the connection's own task: see
//! [`crate::device::BlockDevice::read_cached`]), on a few dedicated threads, never on the
//! tokio workers that also answer DHCP and HTTP in `fleetboot serve`: a slow or full disk then slows NBD clients,
//! not the boot of every other machine. A connection has at most one job in flight (it
//! waits for its result), so the queue is bounded by the connection cap; [`DiskPool`]
//! still refuses jobs past its own bound rather than grow.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// A fixed set of threads running blocking jobs for async callers.
pub struct DiskPool {
    shared: Arc<Shared>,
    capacity: usize,
    threads: usize,
}

impl std::fmt::Debug for DiskPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskPool").field("threads", &self.threads).field("capacity", &self.capacity).finish()
    }
}

impl DiskPool {
    /// `threads` threads (at least 1) and room for `capacity` queued jobs.
    pub fn new(threads: usize, capacity: usize) -> io::Result<DiskPool> {
        let shared = Arc::new(Shared { queue: Mutex::new(Queue::default()), ready: Condvar::new() });
        let threads = threads.max(1);
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new().name(format!("fleetboot-nbd-io-{i}")).spawn(move || worker(&shared))?;
        }
        Ok(DiskPool { shared, capacity: capacity.max(1), threads })
    }

    /// Runs `f` on a pool thread and waits for its result. Fails (without running it) when
    /// the queue is full, and when `f` panicked.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> io::Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.jobs.len() >= self.capacity {
                metrics::counter!("fleetboot_nbd_io_queue_full_total").increment(1);
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "the NBD disk I/O queue is full"));
            }
            q.jobs.push_back(Box::new(move || {
                let _ = tx.send(f());
            }));
            metrics::gauge!("fleetboot_nbd_io_queued").set(q.jobs.len() as f64);
        }
        self.shared.ready.notify_one();
        rx.await.map_err(|_| io::Error::other("an NBD disk I/O job panicked"))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for DiskPool {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panicking job drops its sender (its caller sees an error); the thread lives on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_off_the_caller_and_survives_panics() {
        let pool = DiskPool::new(2, 4).unwrap();
        let caller = std::thread::current().id();
        let (ran_on, name) = pool
            .run(|| (std::thread::current().id(), std::thread::current().name().map(str::to_string)))
            .await
            .unwrap();
        assert_ne!(ran_on, caller);
        assert!(name.unwrap().starts_with("fleetboot-nbd-io-"));
        assert!(pool.run(|| panic!("boom")).await.is_err());
        assert_eq!(pool.run(|| 7).await.unwrap(), 7, "the pool survives a panic");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_instead_of_growing() {
        let pool = Arc::new(DiskPool::new(1, 2).unwrap());
        let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
        // Waited for asynchronously: blocking this test's only runtime thread would keep the
        // job below from ever being queued.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let p = pool.clone();
        // One job occupies the only thread, two more fill the queue.
        let busy = tokio::spawn(async move {
            p.run(move || {
                started_tx.send(()).unwrap();
                block_rx.recv().unwrap();
            })
            .await
        });
        started_rx.await.unwrap();
        let queued: Vec<_> = (0..2).map(|i| {
            let p = pool.clone();
            tokio::spawn(async move { p.run(move || i).await })
        }).collect();
        // Wait until both are queued.
        loop {
            if pool.shared.queue.lock().unwrap().jobs.len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let refused = pool.run(|| 9).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        block_tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap().unwrap(), i);
        }
    }
}

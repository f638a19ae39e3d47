//! One computation per key at a time: concurrent callers for the same key share the first
//! caller's result. If the caller running the computation goes away (its request was
//! dropped), a waiting caller takes over with its own future, so nobody waits on a dead one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::sync::Locked;

pub struct SingleFlight<K, V> {
    /// Each section does one map operation, so a poisoned lock (`Locked`) still guards a
    /// whole map.
    running: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            running: Mutex::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub async fn run<F: Future<Output = V>>(&self, key: &K, compute: F) -> V {
        let cell = self
            .running
            .locked()
            .entry(key.clone())
            .or_default()
            .clone();
        let value = cell.get_or_init(|| compute).await.clone();
        let mut running = self.running.locked();
        if running.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            running.remove(key);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        let flight = Arc::new(SingleFlight::<&str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flight, runs, gate) = (flight.clone(), runs.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(&"k", async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        7
                    })
                    .await
            }));
        }
        tokio::task::yield_now().await;
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Finished keys are forgotten: the next call computes again.
        assert_eq!(flight.run(&"k", async { 8 }).await, 8);
    }

    #[tokio::test]
    async fn a_dropped_runner_hands_over() {
        let flight = Arc::new(SingleFlight::<&str, usize>::default());
        let first = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(&"k", std::future::pending()).await })
        };
        tokio::task::yield_now().await;
        first.abort();
        let _ = first.await;
        assert_eq!(flight.run(&"k", async { 3 }).await, 3);
    }
}

//! A cap on concurrent cold fills, per client address and in total, so that one client
//! cannot turn cistern into an amplifier against the upstreams (each cold digest it asks for
//! costs an upstream download that runs on even after the client has gone).
//!
//! Only *starting* a fill takes a slot: cache hits and requests that join a running fill cost
//! the upstreams nothing and are never capped. A slot is held by the fill (not the request)
//! until the fill ends, because the upstream download is what the cap bounds.
//!
//! What is over the cap gets 429 with `Retry-After` at once rather than waiting for a slot:
//! a waiting request still holds a connection and a task, so a flooding client would tie up
//! cistern instead of the upstreams; a 429 pushes back on the client itself. Real clients
//! pull a handful of layers at a time (Docker and containerd 3, podman 6), far below the
//! default per-address cap, and retry a 429 after `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// What a client over the cap is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The counts of running fills, by the address that started them and in total.
#[derive(Debug)]
pub struct FillLimits {
    /// Most fills one address may have running; 0: no cap.
    per_client: usize,
    /// Most fills running at once; 0: no cap.
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// One running fill's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct FillSlot {
    client: Option<IpAddr>,
    counts: Arc<Mutex<Counts>>,
}

impl FillLimits {
    pub fn new(per_client: usize, total: usize) -> FillLimits {
        FillLimits {
            per_client,
            total,
            counts: Arc::default(),
        }
    }

    /// No cap at all (for tools and tests that start fills without a client).
    pub fn unlimited() -> FillLimits {
        FillLimits::new(0, 0)
    }

    /// A slot for a new fill started by `client` (None: no client address known, counted in
    /// the total only), or the 429 to answer.
    pub fn try_start(&self, client: Option<IpAddr>) -> Result<FillSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.total > 0 && counts.total >= self.total {
            return Err(over_cap(format!(
                "{} blob downloads are running, the most allowed (cache.max_fills); retry shortly",
                counts.total
            )));
        }
        if let Some(ip) = client {
            let mine = counts.by_client.get(&ip).copied().unwrap_or(0);
            if self.per_client > 0 && mine >= self.per_client {
                return Err(over_cap(format!(
                    "this client has {mine} blob downloads running, the most allowed per client (cache.max_fills_per_client); retry shortly"
                )));
            }
            counts.by_client.insert(ip, mine + 1);
        }
        counts.total += 1;
        Ok(FillSlot {
            client,
            counts: self.counts.clone(),
        })
    }

    /// Fills running now (for tests and stats).
    pub fn running(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

fn over_cap(message: String) -> Error {
    Error::new(
        ErrorKind::TooManyRequests {
            retry_after: Some(RETRY_AFTER),
        },
        message,
    )
}

impl Drop for FillSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.client
            && let Some(n) = counts.by_client.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Forget the address: the map holds only clients with fills running.
                counts.by_client.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn caps_each_client_and_the_total() {
        let limits = FillLimits::new(2, 3);
        let a1 = limits.try_start(ip(1)).unwrap();
        let _a2 = limits.try_start(ip(1)).unwrap();
        let e = limits.try_start(ip(1)).unwrap_err();
        assert_eq!(
            e.kind,
            ErrorKind::TooManyRequests {
                retry_after: Some(RETRY_AFTER)
            }
        );
        let _b1 = limits.try_start(ip(2)).unwrap();
        assert!(limits.try_start(ip(3)).is_err(), "the total is reached");
        assert!(limits.try_start(None).is_err(), "the total binds everyone");
        drop(a1);
        assert_eq!(limits.running(), 2);
        let _a3 = limits.try_start(ip(1)).unwrap();
    }

    #[test]
    fn zero_means_no_cap_and_slots_are_forgotten() {
        let limits = FillLimits::new(0, 0);
        let slots: Vec<_> = (0..100).map(|_| limits.try_start(ip(1)).unwrap()).collect();
        assert_eq!(limits.running(), 100);
        drop(slots);
        assert_eq!(limits.running(), 0);
        assert!(limits.counts.lock().unwrap().by_client.is_empty());
    }
}

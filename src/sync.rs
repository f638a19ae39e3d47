//! Taking a std mutex without a panic path.
//!
//! `Mutex::lock` fails only when another thread panicked while it held the lock ("poisoning").
//! The usual `.lock().expect(..)` turns that one panic into a panic of every later caller:
//! each request that touches the same map or counter would then fail too, and a lock taken in
//! a `Drop` during unwinding would abort the process. cistern recovers the guard instead.
//!
//! That is right here because every mutex in cistern guards state that a panic cannot leave
//! half-updated in a way worse than the panic itself: the critical sections are short
//! straight-line code (insert into or remove from a map, set a small enum, move a counter)
//! with no panic path of their own (the `unwrap_used`, `expect_used`, `panic` and
//! `indexing_slicing` lints are denied). Where a section changes two things together, the
//! mutex's declaration says what a panic between them would leave behind.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// [`Mutex::lock`], recovering the guard of a poisoned mutex (see the module's comment).
pub trait Locked<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_mutex_is_still_usable_with_what_it_held() {
        let m = Arc::new(Mutex::new(vec![1]));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut v = held.lock().unwrap();
            v.push(2);
            panic!("a panic while holding the lock poisons it");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), vec![1, 2]);
        m.locked().push(3);
        assert_eq!(*m.locked(), vec![1, 2, 3]);
    }
}

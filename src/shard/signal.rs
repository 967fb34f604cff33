//! A shard-local, one-shot broadcast: "the shard is draining".
//!
//! Every connection driver holds one [`Drain::wait`] future in its select loop; firing the
//! signal wakes them all. Single-threaded (`Rc`/`Cell`), no allocation per poll once
//! registered.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// The shard's drain signal.
#[derive(Default)]
pub(crate) struct Drain {
    fired: Cell<bool>,
    next_id: Cell<u64>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

impl Drain {
    /// Fire the signal and wake every waiter.
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// A future that completes when the signal fires.
    pub(crate) fn wait(&self) -> DrainWait<'_> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        DrainWait { drain: self, id }
    }
}

/// Future returned by [`Drain::wait`].
pub(crate) struct DrainWait<'a> {
    drain: &'a Drain,
    id: u64,
}

impl Future for DrainWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.fired.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.drain.wakers.borrow_mut();
        match wakers.get_mut(&self.id) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => w.clone_from(cx.waker()),
            None => {
                wakers.insert(self.id, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        self.drain.wakers.borrow_mut().remove(&self.id);
    }
}

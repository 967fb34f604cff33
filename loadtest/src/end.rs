//! The end-of-run signal shared by the scenarios' connections on one worker.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::future::FusedFuture;

use crate::echo::Timing;

/// After a worker's connections are up: tell the main thread (`connected`), wait for the run's
/// timing, and start the task that fires the returned [`End`] `after` the run's end. Returns
/// the timing, the signal and that task (detach it once the connections are done).
pub async fn start(
    connected: &std::sync::mpsc::Sender<()>,
    timing: &std::sync::OnceLock<Timing>,
    after: std::time::Duration,
) -> (Timing, std::rc::Rc<End>, compio::runtime::JoinHandle<()>) {
    let _ = connected.send(());
    let t = loop {
        match timing.get() {
            Some(t) => break *t,
            None => compio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    };
    let end = std::rc::Rc::new(End::default());
    let ender = {
        let end = end.clone();
        compio::runtime::spawn(async move {
            compio::time::sleep_until(t.end + after).await;
            end.fire();
        })
    };
    (t, end, ender)
}

/// Fires once (end of a run, end of reading) and wakes every connection of a worker. Polling it is a
/// `Cell` read; a compio timer per connection would read the clock and walk the timer tree
/// on every wake-up, which cost the client a fifth of its rate.
#[derive(Default)]
pub struct End {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl End {
    /// Fire (once; later calls are harmless) and wake every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// A future that resolves once fired; it never terminates before, so it can be polled
    /// in a `select!` every loop turn.
    pub fn wait(&self) -> EndWait<'_> {
        EndWait {
            end: self,
            slot: None,
        }
    }
}

/// Future returned by [`End::wait`].
pub struct EndWait<'a> {
    end: &'a End,
    slot: Option<usize>,
}

impl Future for EndWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.end.fired.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.end.wakers.borrow_mut();
        match self.slot {
            Some(i) if wakers[i].will_wake(cx.waker()) => {}
            Some(i) => wakers[i] = cx.waker().clone(),
            None => {
                wakers.push(cx.waker().clone());
                let i = wakers.len() - 1;
                drop(wakers);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl FusedFuture for EndWait<'_> {
    fn is_terminated(&self) -> bool {
        false
    }
}

//! Shard-local connection signals: drain and keepalive without a timer per connection.
//!
//! Every open WebSocket registers a [`ConnSignal`] in the shard's [`Registry`]. One sweeper
//! task per shard ticks at a coarse period and raises flags on the connections that need
//! something (a keepalive ping, an idle close); the drain raises a flag on all of them. A
//! connection's select loop holds one [`SignalWait`], whose poll is a `Cell` read: a busy
//! connection costs no timer operation and no clock read per message, which a per-connection
//! timer did (measured: ~3% of an echo shard's CPU), and an idle one holds ~60 bytes of
//! signal state instead of a timer future and a timer-wheel entry.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures_util::future::FusedFuture;

/// The shard is draining: close at this connection's turn.
pub(crate) const DRAIN: u8 = 1;
/// Nothing arrived for `idle_timeout`: send a keepalive ping.
pub(crate) const PING: u8 = 2;
/// Nothing arrived for `pong_timeout` after the ping: close.
pub(crate) const IDLE_CLOSE: u8 = 4;

/// Per-connection state shared between the connection task and the shard.
pub(crate) struct ConnSignal {
    flags: Cell<u8>,
    waker: Cell<Option<Waker>>,
    /// Set by the connection on every read; cleared by the sweeper.
    activity: Cell<bool>,
    /// Sweeper ticks without activity.
    silent_ticks: Cell<u32>,
    /// Ticks of silence after which a ping is sent (0 = keepalive off).
    ping_after: u32,
    /// Ticks of silence after which the connection is closed.
    close_after: u32,
}

impl ConnSignal {
    /// Note inbound traffic (any bytes).
    pub(crate) fn touch(&self) {
        self.activity.set(true);
    }

    /// A future that resolves to the raised flags (and clears them).
    pub(crate) fn wait(&self) -> SignalWait<'_> {
        SignalWait(self)
    }

    fn raise(&self, flag: u8) {
        self.flags.set(self.flags.get() | flag);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Future returned by [`ConnSignal::wait`]; never terminates, so it can be re-created every
/// loop iteration.
pub(crate) struct SignalWait<'a>(&'a ConnSignal);

impl Future for SignalWait<'_> {
    type Output = u8;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u8> {
        let s = self.0;
        let flags = s.flags.replace(0);
        if flags != 0 {
            return Poll::Ready(flags);
        }
        match s.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => s.waker.set(Some(w)),
            _ => s.waker.set(Some(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl FusedFuture for SignalWait<'_> {
    fn is_terminated(&self) -> bool {
        false
    }
}

/// The shard's table of open connections.
#[derive(Default)]
pub(crate) struct Registry {
    slots: RefCell<Vec<Option<Rc<ConnSignal>>>>,
    free: RefCell<Vec<usize>>,
    draining: Cell<bool>,
}

/// Removes a connection from the registry when dropped.
pub(crate) struct Registration<'a> {
    registry: &'a Registry,
    slot: usize,
    /// The connection's signal.
    pub(crate) signal: Rc<ConnSignal>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.slots.borrow_mut()[self.slot] = None;
        self.registry.free.borrow_mut().push(self.slot);
    }
}

impl Registry {
    /// Register a connection. `ping_after`/`close_after` are in sweeper ticks (0 = no
    /// keepalive). A connection registered during a drain is told at once.
    pub(crate) fn register(&self, ping_after: u32, close_after: u32) -> Registration<'_> {
        let signal = Rc::new(ConnSignal {
            flags: Cell::new(if self.draining.get() { DRAIN } else { 0 }),
            waker: Cell::new(None),
            activity: Cell::new(false),
            silent_ticks: Cell::new(0),
            ping_after,
            close_after,
        });
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i] = Some(signal.clone());
                i
            }
            None => {
                slots.push(Some(signal.clone()));
                slots.len() - 1
            }
        };
        Registration {
            registry: self,
            slot,
            signal,
        }
    }

    /// True once the shard is draining.
    pub(crate) fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Tell every connection to drain.
    pub(crate) fn drain(&self) {
        self.draining.set(true);
        for s in self.slots.borrow().iter().flatten() {
            s.raise(DRAIN);
        }
    }

    /// One sweeper tick: count silence, raise PING / IDLE_CLOSE where due.
    pub(crate) fn tick(&self) {
        for s in self.slots.borrow().iter().flatten() {
            if s.ping_after == 0 {
                continue;
            }
            if s.activity.replace(false) {
                s.silent_ticks.set(0);
                continue;
            }
            let silent = s.silent_ticks.get().saturating_add(1);
            s.silent_ticks.set(silent);
            if silent == s.ping_after {
                s.raise(PING);
            } else if silent == s.close_after {
                s.raise(IDLE_CLOSE);
            }
        }
    }

    /// Connections registered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_ticks_and_drain() {
        let r = Registry::default();
        let a = r.register(2, 4);
        let b = r.register(0, 0);
        assert_eq!(r.len(), 2);
        r.tick();
        assert_eq!(a.signal.flags.get(), 0);
        r.tick();
        assert_eq!(a.signal.flags.replace(0), PING);
        a.signal.touch();
        r.tick(); // activity resets the count
        r.tick();
        r.tick();
        assert_eq!(a.signal.flags.replace(0), PING);
        r.tick();
        assert_eq!(a.signal.flags.get(), 0, "pong timeout not reached yet");
        r.tick();
        assert_eq!(a.signal.flags.replace(0), IDLE_CLOSE);
        assert_eq!(b.signal.flags.get(), 0, "keepalive off");
        r.drain();
        assert_eq!(b.signal.flags.get(), DRAIN);
        drop(a);
        assert_eq!(r.len(), 1);
        let c = r.register(1, 2);
        assert_eq!(
            c.signal.flags.get(),
            DRAIN,
            "late registrations drain at once"
        );
        assert_eq!(r.len(), 2);
    }
}

//! Cross-shard delivery: one bounded lock-free SPSC ring per ordered pair of shards.
//!
//! A shard stages the messages its publishers produce in an outbox; [`Link::flush`] moves the
//! whole outbox into one [`Batch`] per peer shard (one ring entry per batch, never one per
//! message) and rings the peer's doorbell once. A doorbell is an atomic flag plus a waker: a
//! producer wakes the consumer only when the flag goes from clear to set, so a burst of batches
//! costs one cross-thread wake-up, and the consumer clears the flag before draining, so no
//! batch is missed. Rings are `rtrb` (measured the fastest SPSC queue on this machine, see
//! `docs/design/002-fanout-plan.md`); a full ring never blocks the publisher: the batch is
//! counted as dropped for that peer shard (`ring_full_drops`).
//!
//! Ordering: a publisher lives on one shard; its messages enter its shard's outbox, each peer
//! ring, and each peer's hub in publish order.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;

/// Batches in flight per ordered shard pair.
pub const RING_CAPACITY: usize = 1024;

/// Messages published on one shard during one flush interval, for one peer shard.
pub struct Batch {
    /// (topic, encoded frame) in publish order.
    pub msgs: Vec<(Arc<str>, Bytes)>,
}

#[derive(Default)]
struct Doorbell {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Doorbell {
    fn ring(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

/// One shard's ends of the rings: producers to every peer, consumers from every peer.
pub struct Link {
    outs: RefCell<Vec<(rtrb::Producer<Batch>, Arc<Doorbell>)>>,
    ins: RefCell<Vec<rtrb::Consumer<Batch>>>,
    bell: Arc<Doorbell>,
    outbox: RefCell<Vec<(Arc<str>, Bytes)>>,
    batches_out: Cell<u64>,
    batches_in: Cell<u64>,
    full_drops: Cell<u64>,
}

/// Build the links of `n` shards (index = shard id). Each link is moved to its shard.
pub fn build(n: usize) -> Vec<Link> {
    let bells: Vec<Arc<Doorbell>> = (0..n).map(|_| Arc::default()).collect();
    let mut outs: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
    let mut ins: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
    for (from, out) in outs.iter_mut().enumerate() {
        for (to, bell) in bells.iter().enumerate() {
            if from != to {
                let (p, c) = rtrb::RingBuffer::new(RING_CAPACITY);
                out.push((p, bell.clone()));
                ins[to].push(c);
            }
        }
    }
    outs.into_iter()
        .zip(ins)
        .zip(bells)
        .map(|((outs, ins), bell)| Link {
            outs: RefCell::new(outs),
            ins: RefCell::new(ins),
            bell,
            outbox: RefCell::default(),
            batches_out: Cell::new(0),
            batches_in: Cell::new(0),
            full_drops: Cell::new(0),
        })
        .collect()
}

impl Link {
    /// Number of shards in the mesh (this one included).
    pub fn shards(&self) -> usize {
        self.outs.borrow().len() + 1
    }

    /// True when there are other shards to send to.
    pub fn has_peers(&self) -> bool {
        !self.outs.borrow().is_empty()
    }

    /// Stage a message for the peer shards (sent at the next [`Self::flush`]).
    pub fn stage(&self, topic: &Arc<str>, frame: &Bytes) {
        if self.has_peers() {
            self.outbox
                .borrow_mut()
                .push((topic.clone(), frame.clone()));
        }
    }

    /// Send the staged messages: one batch per peer shard, one wake-up per peer.
    pub fn flush(&self) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() {
            return;
        }
        let msgs = std::mem::take(&mut *outbox);
        drop(outbox);
        let mut outs = self.outs.borrow_mut();
        let last = outs.len() - 1;
        let mut msgs = Some(msgs);
        for (i, (p, bell)) in outs.iter_mut().enumerate() {
            let batch = if i == last {
                // Invariant: taken only once, at the last peer.
                msgs.take().expect("batch for the last peer")
            } else {
                msgs.as_ref().expect("batch present").clone()
            };
            let n = batch.len() as u64;
            match p.push(Batch { msgs: batch }) {
                Ok(()) => {
                    self.batches_out.set(self.batches_out.get() + 1);
                    bell.ring();
                }
                Err(_) => self.full_drops.set(self.full_drops.get() + n),
            }
        }
    }

    /// Resolves when a peer has rung this shard's doorbell since the last call.
    pub fn wait(&self) -> Wait<'_> {
        Wait(&self.bell)
    }

    /// Hand every batch waiting in the rings to `f`, message by message, in order per peer.
    pub fn drain(&self, mut f: impl FnMut(&str, &Bytes)) {
        let mut ins = self.ins.borrow_mut();
        for c in ins.iter_mut() {
            while let Ok(batch) = c.pop() {
                self.batches_in.set(self.batches_in.get() + 1);
                for (topic, frame) in &batch.msgs {
                    f(topic, frame);
                }
            }
        }
    }

    /// (batches sent, batches received, messages dropped on full rings).
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.batches_out.get(),
            self.batches_in.get(),
            self.full_drops.get(),
        )
    }
}

/// Future returned by [`Link::wait`].
pub struct Wait<'a>(&'a Doorbell);

impl Future for Wait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let bell = self.0;
        if bell.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        bell.waker.register(cx.waker());
        // A ring between the first check and the registration must not be lost.
        if bell.pending.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cross_threads_in_order_with_one_wake_per_burst() {
        let mut links = build(2);
        let b = links.pop().unwrap();
        let a = links.pop().unwrap();
        let topic: Arc<str> = Arc::from("t");
        let t = std::thread::spawn(move || {
            for i in 0..10_000u32 {
                a.stage(&topic, &Bytes::copy_from_slice(&i.to_be_bytes()));
                if i % 100 == 0 {
                    a.flush();
                }
            }
            a.flush();
            a.counters()
        });
        let mut next = 0u32;
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while next < 10_000 {
            let mut w = b.wait();
            if Pin::new(&mut w).poll(&mut cx).is_ready() {
                b.drain(|topic, frame| {
                    assert_eq!(topic, "t");
                    assert_eq!(frame[..], next.to_be_bytes());
                    next += 1;
                });
            } else {
                std::thread::yield_now();
            }
        }
        let (out, _, full) = t.join().unwrap();
        assert_eq!(full, 0);
        assert_eq!(b.counters().1, out);
    }

    #[test]
    fn a_full_ring_counts_drops_and_never_blocks() {
        let links = build(2);
        let topic: Arc<str> = Arc::from("t");
        for _ in 0..RING_CAPACITY + 5 {
            links[0].stage(&topic, &Bytes::from_static(b"x"));
            links[0].stage(&topic, &Bytes::from_static(b"y"));
            links[0].flush();
        }
        assert_eq!(links[0].counters(), (RING_CAPACITY as u64, 0, 10));
        let mut n = 0;
        links[1].drain(|_, _| n += 1);
        assert_eq!(n, 2 * RING_CAPACITY);
        assert!(!build(1)[0].has_peers());
    }
}

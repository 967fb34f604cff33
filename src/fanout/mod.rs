//! Broadcast fan-out: topics, bounded per-subscriber queues, and the rings between shards.
//!
//! Runtime-free, like [`crate::proto`]: no sockets, no clock, no executor. The shard runtime
//! owns one [`Hub`] per shard and one [`mesh::Link`] per shard and drives them.
//!
//! Life of a broadcast message:
//! 1. A publisher's message is framed once ([`encode`]): header + payload in one [`Bytes`].
//! 2. The publisher's shard hands it to its local [`Hub`], which pushes a reference (a `Bytes`
//!    clone, no copy) into the queue of every local subscriber of the topic, and stages it in
//!    the shard's [`mesh::Link`] outbox.
//! 3. After the publisher's read has been processed, the outbox is flushed: one batch per peer
//!    shard into a bounded lock-free SPSC ring, one wake-up per batch.
//! 4. A peer shard drains its rings, copies each frame once into shard-local memory, and hands
//!    it to its own hub (step 2 without the staging).
//! 5. Each subscriber connection takes frames from its queue and writes many per submission
//!    (vectored write), so the cost per delivery is a reference and an iovec.
//!
//! Subscribers that negotiated permessage-deflate get a compressed variant of the frame
//! instead: the hub compresses a message once per shard (no context takeover, so one
//! compressed frame is valid for every such subscriber; one variant per LZ77 window size
//! the subscribers allow, in practice one), the first time a subscriber needs it, and shares
//! it the same way. Messages below a subscriber's threshold, or that would not shrink, are
//! delivered plain.
//!
//! Backpressure is per subscriber and explicit: a queue is capped in bytes and in messages,
//! and when a push would exceed a cap the route's [`LagPolicy`] decides. The cap is checked
//! before the push, so a queue never exceeds it by more than one frame (a single frame larger
//! than the byte cap is accepted into an empty queue, or it could never be delivered). Every
//! drop and every slow-consumer close is counted by route and reason ([`FanoutSnapshot`]).

pub mod mesh;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::str::FromStr;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::future::FusedFuture;
use serde::Serialize;

use crate::proto::frame::{OpCode, decode_header, encode_compressed_frame, encode_frame};
use crate::proto::{Compressor, MessageKind};

/// What happens when a subscriber's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagPolicy {
    /// Discard the oldest queued messages to make room (the subscriber sees a gap).
    DropOldest,
    /// Discard the new message (the subscriber sees a gap).
    DropNewest,
    /// Close the subscriber with 1008 and a reason; it can reconnect and resynchronise.
    Close,
}

impl LagPolicy {
    /// The config value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DropOldest => "drop_oldest",
            Self::DropNewest => "drop_newest",
            Self::Close => "close",
        }
    }
}

impl FromStr for LagPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop_oldest" => Ok(Self::DropOldest),
            "drop_newest" => Ok(Self::DropNewest),
            "close" => Ok(Self::Close),
            other => Err(format!(
                "unknown lag policy `{other}` (expected drop_oldest, drop_newest or close)"
            )),
        }
    }
}

/// Caps of one subscriber's queue and what to do when they are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Queued frame bytes (header + payload).
    pub max_bytes: usize,
    /// Queued frames.
    pub max_messages: usize,
    /// Policy when a push would exceed a cap.
    pub policy: LagPolicy,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_messages: 4096,
            policy: LagPolicy::Close,
        }
    }
}

/// Why a message did not reach a subscriber. Metric label `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Discarded from the head of a full queue (`drop_oldest`).
    DropOldest,
    /// Refused at the tail of a full queue (`drop_newest`).
    DropNewest,
    /// The subscriber was closed as too slow (`close`); counted once per close.
    SlowClose,
}

impl DropReason {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::DropOldest => "drop_oldest",
            Self::DropNewest => "drop_newest",
            Self::SlowClose => "slow_consumer_close",
        }
    }
}

/// Frame one broadcast message for sending by a server (FIN, unmasked).
pub fn encode(kind: MessageKind, payload: &[u8]) -> Bytes {
    let opcode = match kind {
        MessageKind::Text => OpCode::Text,
        MessageKind::Binary => OpCode::Binary,
    };
    let mut out = Vec::new();
    encode_frame(true, opcode, payload, None, &mut out);
    Bytes::from(out)
}

/// How a subscriber that negotiated permessage-deflate takes broadcasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberDeflate {
    /// Messages with shorter payloads are delivered plain.
    pub threshold: usize,
    /// Largest LZ77 window the subscriber allows (log2, 9..=15).
    pub window_bits: u8,
}

impl SubscriberDeflate {
    /// The preference of a server connection that agreed on `params`; `None` when
    /// broadcasts cannot be compressed for it (a window limit below 9 bits).
    pub fn new(params: &crate::proto::DeflateParams, threshold: usize) -> Option<Self> {
        let window_bits = params.server_max_window_bits.unwrap_or(15);
        (9..=15).contains(&window_bits).then_some(Self {
            threshold,
            window_bits,
        })
    }
}

/// Counters of one shard's fan-out. Only the shard thread touches them.
#[derive(Debug, Default)]
struct Counters {
    published: Cell<u64>,
    deliveries: Cell<u64>,
    delivered_bytes: Cell<u64>,
    queued_bytes: Cell<u64>,
    queued_messages: Cell<u64>,
    deflated: Cell<u64>,
    deflated_in: Cell<u64>,
    deflated_out: Cell<u64>,
    deflated_deliveries: Cell<u64>,
    drops: RefCell<Vec<(Rc<str>, DropReason, u64)>>,
}

impl Counters {
    fn drop_one(&self, route: &Rc<str>, why: DropReason, n: u64) {
        let mut drops = self.drops.borrow_mut();
        match drops
            .iter_mut()
            .find(|(r, w, _)| *w == why && Rc::ptr_eq(r, route))
        {
            Some((_, _, c)) => *c += n,
            None => drops.push((route.clone(), why, n)),
        }
    }
}

/// One subscriber's queue, shared by the hub (producer) and its connection (consumer).
struct Subscriber {
    queue: RefCell<VecDeque<Bytes>>,
    bytes: Cell<usize>,
    limits: QueueLimits,
    /// Set when the `close` policy fired; the queue is emptied and stays empty.
    overflowed: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// Route path, for the drop counters.
    route: Rc<str>,
    /// Takes compressed variants (permessage-deflate negotiated).
    deflate: Option<SubscriberDeflate>,
    /// Position in its topic's subscriber list (for O(1) removal).
    index: Cell<usize>,
}

impl Subscriber {
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Queue `frame` under the caps and the policy.
    fn push(&self, frame: &Bytes, c: &Counters, compressed: bool) {
        if self.overflowed.get() {
            return;
        }
        let len = frame.len();
        let mut q = self.queue.borrow_mut();
        let full = |q: &VecDeque<Bytes>, bytes: usize| {
            !q.is_empty()
                && (q.len() >= self.limits.max_messages || bytes + len > self.limits.max_bytes)
        };
        if full(&q, self.bytes.get()) {
            match self.limits.policy {
                LagPolicy::DropNewest => {
                    c.drop_one(&self.route, DropReason::DropNewest, 1);
                    return;
                }
                LagPolicy::DropOldest => {
                    let mut dropped = 0;
                    while full(&q, self.bytes.get()) {
                        // Invariant: `full` implies a non-empty queue.
                        let old = q.pop_front().expect("non-empty queue");
                        self.bytes.set(self.bytes.get() - old.len());
                        c.queued_bytes.set(c.queued_bytes.get() - old.len() as u64);
                        c.queued_messages.set(c.queued_messages.get() - 1);
                        dropped += 1;
                    }
                    c.drop_one(&self.route, DropReason::DropOldest, dropped);
                }
                LagPolicy::Close => {
                    self.overflowed.set(true);
                    c.drop_one(&self.route, DropReason::SlowClose, 1);
                    c.queued_bytes
                        .set(c.queued_bytes.get() - self.bytes.get() as u64);
                    c.queued_messages
                        .set(c.queued_messages.get() - q.len() as u64);
                    self.bytes.set(0);
                    *q = VecDeque::new();
                    drop(q);
                    self.wake();
                    return;
                }
            }
        }
        let was_empty = q.is_empty();
        q.push_back(frame.clone());
        self.bytes.set(self.bytes.get() + len);
        c.queued_bytes.set(c.queued_bytes.get() + len as u64);
        c.queued_messages.set(c.queued_messages.get() + 1);
        c.deliveries.set(c.deliveries.get() + 1);
        c.delivered_bytes.set(c.delivered_bytes.get() + len as u64);
        if compressed {
            c.deflated_deliveries.set(c.deflated_deliveries.get() + 1);
        }
        drop(q);
        if was_empty {
            self.wake();
        }
    }
}

/// One shard's topics and their local subscribers.
#[derive(Default)]
pub struct Hub {
    topics: RefCell<HashMap<Rc<str>, Vec<Rc<Subscriber>>>>,
    subscribers: Cell<u64>,
    counters: Counters,
    /// Compresses broadcasts for subscribers that negotiated permessage-deflate.
    compressor: RefCell<Compressor>,
}

/// The compressed variants of one broadcast, by window size (index: bits - 9), made on
/// first need: `Some(None)` = tried, not worth compressing.
type Variants = [Option<Option<Bytes>>; 7];

impl Hub {
    /// Subscribe to `topic` (created on first use) until the returned guard is dropped.
    pub fn subscribe(&self, topic: &str, limits: QueueLimits, route: Rc<str>) -> Subscription<'_> {
        self.subscribe_with(topic, limits, route, None)
    }

    /// [`Hub::subscribe`] for a subscriber that takes compressed frames per `deflate`.
    pub fn subscribe_with(
        &self,
        topic: &str,
        limits: QueueLimits,
        route: Rc<str>,
        deflate: Option<SubscriberDeflate>,
    ) -> Subscription<'_> {
        let mut topics = self.topics.borrow_mut();
        let list = match topics.get_mut(topic) {
            Some(l) => l,
            None => topics.entry(Rc::from(topic)).or_default(),
        };
        let sub = Rc::new(Subscriber {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            limits,
            overflowed: Cell::new(false),
            waker: Cell::new(None),
            route,
            deflate,
            index: Cell::new(list.len()),
        });
        list.push(sub.clone());
        self.subscribers.set(self.subscribers.get() + 1);
        Subscription {
            hub: self,
            topic: Rc::from(topic),
            sub,
        }
    }

    fn unsubscribe(&self, topic: &str, sub: &Subscriber) {
        let mut topics = self.topics.borrow_mut();
        // Invariant: a live subscription's topic exists and lists it at `index`.
        let list = topics.get_mut(topic).expect("subscribed topic exists");
        let i = sub.index.get();
        list.swap_remove(i);
        if let Some(moved) = list.get(i) {
            moved.index.set(i);
        }
        if list.is_empty() {
            topics.remove(topic);
        }
        self.subscribers.set(self.subscribers.get() - 1);
        let c = &self.counters;
        c.queued_bytes
            .set(c.queued_bytes.get() - sub.bytes.get() as u64);
        c.queued_messages
            .set(c.queued_messages.get() - sub.queue.borrow().len() as u64);
    }

    /// Count a message published on this shard (by a client or the admin API), before its
    /// deliveries.
    pub fn note_published(&self) {
        self.counters
            .published
            .set(self.counters.published.get() + 1);
    }

    /// Queue an encoded frame (from [`encode`]) for every local subscriber of `topic`, or its
    /// compressed variant for the subscribers that take one. Returns how many subscribers it
    /// was offered to (0 when the topic has none here).
    pub fn publish(&self, topic: &str, frame: &Bytes) -> usize {
        let topics = self.topics.borrow();
        let Some(list) = topics.get(topic) else {
            return 0;
        };
        let mut variants = Variants::default();
        for s in list {
            match s
                .deflate
                .and_then(|d| self.deflated(frame, d, &mut variants))
            {
                Some(z) => s.push(&z, &self.counters, true),
                None => s.push(frame, &self.counters, false),
            }
        }
        list.len()
    }

    /// The compressed variant of `frame` for a subscriber with preference `d`, compressed
    /// at most once per window size per publish; `None`: deliver the plain frame.
    fn deflated(
        &self,
        frame: &Bytes,
        d: SubscriberDeflate,
        variants: &mut Variants,
    ) -> Option<Bytes> {
        let (header, header_len) = decode_header(frame).ok()??;
        let payload = &frame[header_len..];
        if payload.len() < d.threshold || header.rsv != 0 || !header.fin {
            return None;
        }
        let slot = variants.get_mut(usize::from(d.window_bits.checked_sub(9)?))?;
        slot.get_or_insert_with(|| {
            let opcode = OpCode::from_u8(header.opcode)?;
            let mut z = self.compressor.borrow_mut();
            let compressed = z.compress(payload, d.window_bits)?;
            let c = &self.counters;
            c.deflated.set(c.deflated.get() + 1);
            c.deflated_in
                .set(c.deflated_in.get() + payload.len() as u64);
            c.deflated_out
                .set(c.deflated_out.get() + compressed.len() as u64);
            let mut out = Vec::with_capacity(compressed.len() + 10);
            encode_compressed_frame(opcode, compressed, None, &mut out);
            Some(Bytes::from(out))
        })
        .clone()
    }

    /// Current counters.
    pub fn snapshot(&self) -> FanoutSnapshot {
        let c = &self.counters;
        FanoutSnapshot {
            topics: self.topics.borrow().len() as u64,
            subscribers: self.subscribers.get(),
            published: c.published.get(),
            deliveries: c.deliveries.get(),
            delivered_bytes: c.delivered_bytes.get(),
            queued_bytes: c.queued_bytes.get(),
            queued_messages: c.queued_messages.get(),
            deflated: c.deflated.get(),
            deflated_in: c.deflated_in.get(),
            deflated_out: c.deflated_out.get(),
            deflated_deliveries: c.deflated_deliveries.get(),
            drops: c
                .drops
                .borrow()
                .iter()
                .map(|(r, w, n)| (r.to_string(), w.label(), *n))
                .collect(),
            ..FanoutSnapshot::default()
        }
    }
}

/// A connection's subscription: its queue, until dropped.
pub struct Subscription<'a> {
    hub: &'a Hub,
    topic: Rc<str>,
    sub: Rc<Subscriber>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.topic, &self.sub);
    }
}

impl Subscription<'_> {
    /// Frames waiting to be written.
    pub fn has_frames(&self) -> bool {
        !self.sub.queue.borrow().is_empty()
    }

    /// True once the `close` policy has fired: the connection must close with 1008.
    pub fn overflowed(&self) -> bool {
        self.sub.overflowed.get()
    }

    /// Move queued frames to `out` (in order) until `max_frames` frames or at least
    /// `max_bytes` bytes were taken (at least one frame if any is queued). Returns the bytes
    /// taken.
    pub fn take(&self, out: &mut Vec<Bytes>, max_bytes: usize, max_frames: usize) -> usize {
        let mut q = self.sub.queue.borrow_mut();
        let mut taken = 0;
        let mut n = 0;
        while taken < max_bytes && n < max_frames {
            let Some(f) = q.pop_front() else { break };
            taken += f.len();
            n += 1;
            out.push(f);
        }
        self.sub.bytes.set(self.sub.bytes.get() - taken);
        let c = &self.hub.counters;
        c.queued_bytes.set(c.queued_bytes.get() - taken as u64);
        c.queued_messages.set(c.queued_messages.get() - n as u64);
        taken
    }

    /// A future that resolves when frames are queued (if `frames`) or the queue overflowed
    /// (if `overflow`). With neither it is terminated, so a `select!` skips it: frames are
    /// not wanted while a write is in flight (the next batch is taken when it completes).
    pub fn ready(&self, frames: bool, overflow: bool) -> Ready<'_> {
        Ready {
            sub: Some(&self.sub),
            frames,
            overflow,
        }
    }
}

/// Future returned by [`Subscription::ready`].
pub struct Ready<'a> {
    sub: Option<&'a Subscriber>,
    frames: bool,
    overflow: bool,
}

impl Ready<'_> {
    /// A terminated future, for connections without a subscription.
    pub fn never() -> Self {
        Self {
            sub: None,
            frames: false,
            overflow: false,
        }
    }
}

impl Future for Ready<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(s) = self.sub.filter(|_| self.frames || self.overflow) else {
            return Poll::Pending;
        };
        if (self.overflow && s.overflowed.get()) || (self.frames && !s.queue.borrow().is_empty()) {
            self.frames = false;
            self.overflow = false;
            return Poll::Ready(());
        }
        match s.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => s.waker.set(Some(w)),
            _ => s.waker.set(Some(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl FusedFuture for Ready<'_> {
    fn is_terminated(&self) -> bool {
        self.sub.is_none() || !(self.frames || self.overflow)
    }
}

/// A copy of one shard's fan-out counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FanoutSnapshot {
    /// Topics with at least one subscriber on this shard.
    pub topics: u64,
    /// Subscriptions on this shard.
    pub subscribers: u64,
    /// Messages published on this shard (by clients and the admin API).
    pub published: u64,
    /// Frames queued for subscribers on this shard.
    pub deliveries: u64,
    /// Bytes of those frames.
    pub delivered_bytes: u64,
    /// Frame bytes queued for subscribers now (not yet handed to the kernel).
    pub queued_bytes: u64,
    /// Frames queued for subscribers now.
    pub queued_messages: u64,
    /// Broadcasts compressed (once per shard and window size) for permessage-deflate
    /// subscribers.
    pub deflated: u64,
    /// Their payload bytes before compression.
    pub deflated_in: u64,
    /// Their payload bytes after compression.
    pub deflated_out: u64,
    /// Compressed frames queued for subscribers (included in `deliveries`).
    pub deflated_deliveries: u64,
    /// Messages not delivered, by (route, reason, count).
    pub drops: Vec<(String, &'static str, u64)>,
    /// Batches sent to other shards.
    pub ring_batches_out: u64,
    /// Batches received from other shards.
    pub ring_batches_in: u64,
    /// Messages not sent to another shard because its ring was full.
    pub ring_full_drops: u64,
}

impl FanoutSnapshot {
    /// Add `o` into `self`.
    pub fn merge(&mut self, o: &Self) {
        self.topics += o.topics;
        self.subscribers += o.subscribers;
        self.published += o.published;
        self.deliveries += o.deliveries;
        self.delivered_bytes += o.delivered_bytes;
        self.queued_bytes += o.queued_bytes;
        self.queued_messages += o.queued_messages;
        self.deflated += o.deflated;
        self.deflated_in += o.deflated_in;
        self.deflated_out += o.deflated_out;
        self.deflated_deliveries += o.deflated_deliveries;
        self.ring_batches_out += o.ring_batches_out;
        self.ring_batches_in += o.ring_batches_in;
        self.ring_full_drops += o.ring_full_drops;
        for (r, w, n) in &o.drops {
            match self.drops.iter_mut().find(|(r2, w2, _)| r2 == r && w2 == w) {
                Some((_, _, m)) => *m += n,
                None => self.drops.push((r.clone(), w, *n)),
            }
        }
        self.drops.sort();
    }

    /// Drops with this reason label, all routes.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .filter(|(_, w, _)| *w == reason.label())
            .map(|(_, _, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_bytes: usize, max_messages: usize, policy: LagPolicy) -> QueueLimits {
        QueueLimits {
            max_bytes,
            max_messages,
            policy,
        }
    }

    fn frame(n: u8) -> Bytes {
        encode(MessageKind::Binary, &[n; 8])
    }

    #[test]
    fn delivers_in_order_and_cleans_up_topics() {
        let hub = Hub::default();
        let route: Rc<str> = Rc::from("/sub/{topic}");
        let a = hub.subscribe("t", QueueLimits::default(), route.clone());
        let b = hub.subscribe("t", QueueLimits::default(), route.clone());
        let c = hub.subscribe("u", QueueLimits::default(), route.clone());
        for i in 0..5 {
            assert_eq!(hub.publish("t", &frame(i)), 2);
        }
        assert_eq!(hub.publish("nobody", &frame(0)), 0);
        assert_eq!(hub.snapshot().topics, 2);
        let mut out = Vec::new();
        a.take(&mut out, usize::MAX, usize::MAX);
        assert_eq!(out, (0..5).map(frame).collect::<Vec<_>>());
        assert!(!c.has_frames());
        drop(a);
        drop(c);
        let s = hub.snapshot();
        assert_eq!((s.topics, s.subscribers), (1, 1), "topic u removed");
        assert_eq!(s.queued_messages, 5, "b still holds its frames");
        drop(b);
        let s = hub.snapshot();
        assert_eq!(
            (s.topics, s.subscribers, s.queued_bytes, s.queued_messages),
            (0, 0, 0, 0)
        );
        assert_eq!(s.deliveries, 10);
    }

    #[test]
    fn removal_from_the_middle_keeps_the_others() {
        let hub = Hub::default();
        let r: Rc<str> = Rc::from("r");
        let subs: Vec<_> = (0..4)
            .map(|_| hub.subscribe("t", QueueLimits::default(), r.clone()))
            .collect();
        let mut subs: Vec<Option<_>> = subs.into_iter().map(Some).collect();
        subs[1] = None;
        subs[0] = None;
        hub.publish("t", &frame(1));
        for s in subs.iter().flatten() {
            assert!(s.has_frames());
        }
        assert_eq!(hub.snapshot().subscribers, 2);
    }

    #[test]
    fn policies_cap_the_queue() {
        let f = frame(0).len();
        let r: Rc<str> = Rc::from("r");
        for policy in [
            LagPolicy::DropOldest,
            LagPolicy::DropNewest,
            LagPolicy::Close,
        ] {
            let hub = Hub::default();
            let s = hub.subscribe("t", limits(3 * f, 100, policy), r.clone());
            for i in 0..10 {
                hub.publish("t", &frame(i));
                assert!(hub.snapshot().queued_bytes <= 3 * f as u64);
            }
            let snap = hub.snapshot();
            let mut out = Vec::new();
            s.take(&mut out, usize::MAX, usize::MAX);
            match policy {
                LagPolicy::DropOldest => {
                    assert_eq!(out, vec![frame(7), frame(8), frame(9)]);
                    assert_eq!(snap.drops(DropReason::DropOldest), 7);
                }
                LagPolicy::DropNewest => {
                    assert_eq!(out, vec![frame(0), frame(1), frame(2)]);
                    assert_eq!(snap.drops(DropReason::DropNewest), 7);
                }
                LagPolicy::Close => {
                    assert!(out.is_empty() && s.overflowed());
                    assert_eq!(snap.drops(DropReason::SlowClose), 1);
                    assert_eq!(snap.queued_bytes, 0);
                }
            }
        }
        // The message cap and a frame larger than the byte cap.
        let hub = Hub::default();
        let s = hub.subscribe("t", limits(4, 2, LagPolicy::DropOldest), r.clone());
        hub.publish("t", &frame(1));
        assert!(s.has_frames(), "an oversized frame enters an empty queue");
        hub.publish("t", &frame(2));
        let mut out = Vec::new();
        s.take(&mut out, usize::MAX, usize::MAX);
        assert_eq!(out, vec![frame(2)]);
        let s2 = hub.subscribe("m", limits(1 << 20, 2, LagPolicy::DropNewest), r);
        for i in 0..5 {
            hub.publish("m", &frame(i));
        }
        let mut out = Vec::new();
        s2.take(&mut out, usize::MAX, usize::MAX);
        assert_eq!(out, vec![frame(0), frame(1)]);
    }

    #[test]
    fn take_respects_batch_caps() {
        let hub = Hub::default();
        let s = hub.subscribe("t", QueueLimits::default(), Rc::from("r"));
        for i in 0..10 {
            hub.publish("t", &frame(i));
        }
        let f = frame(0).len();
        let mut out = Vec::new();
        assert_eq!(s.take(&mut out, 1, 100), f, "at least one frame");
        out.clear();
        assert_eq!(s.take(&mut out, usize::MAX, 4), 4 * f);
        out.clear();
        assert_eq!(s.take(&mut out, 2 * f, 100), 2 * f);
        assert_eq!(hub.snapshot().queued_messages, 3);
    }

    #[test]
    fn deflate_subscribers_share_one_compressed_frame() {
        use crate::proto::{Conn, DeflateParams, Event, Limits, Role};
        let hub = Hub::default();
        let r: Rc<str> = Rc::from("r");
        let pref = |bits| {
            Some(SubscriberDeflate {
                threshold: 100,
                window_bits: bits,
            })
        };
        let plain = hub.subscribe("t", QueueLimits::default(), r.clone());
        let z1 = hub.subscribe_with("t", QueueLimits::default(), r.clone(), pref(15));
        let z2 = hub.subscribe_with("t", QueueLimits::default(), r.clone(), pref(15));
        let z9 = hub.subscribe_with("t", QueueLimits::default(), r.clone(), pref(9));
        let big = "{\"price\":43125.5,\"symbol\":\"BTC-USD\"}".repeat(20);
        let frame = encode(MessageKind::Text, big.as_bytes());
        hub.publish("t", &frame);
        hub.publish("t", &encode(MessageKind::Text, b"small"));
        let snap = hub.snapshot();
        // One compression per window size, not per subscriber.
        assert_eq!(snap.deflated, 2);
        assert_eq!(snap.deflated_deliveries, 3);
        assert_eq!(snap.deflated_in, 2 * big.len() as u64);
        let take = |s: &Subscription<'_>| {
            let mut out = Vec::new();
            s.take(&mut out, usize::MAX, usize::MAX);
            out
        };
        let p = take(&plain);
        assert_eq!(p[0], frame);
        let (a, b, c) = (take(&z1), take(&z2), take(&z9));
        assert_eq!(a[0].as_ptr(), b[0].as_ptr(), "the same shared frame");
        assert_eq!(a[0][0], 0xC1, "FIN, RSV1, text");
        assert!(a[0].len() < frame.len() / 3);
        for (frames, bits) in [(a, 15), (c, 9)] {
            // A client that negotiated deflate reads both messages.
            let mut client = Conn::new(Role::Client, Limits::default());
            let params = DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: Some(bits),
                client_max_window_bits: None,
            };
            client.set_deflate(&params, 0);
            let mut buf = bytes::BytesMut::new();
            for f in &frames {
                buf.extend_from_slice(f);
            }
            client.handle_input(&mut buf).unwrap();
            let texts: Vec<Bytes> = std::iter::from_fn(|| client.poll_event())
                .map(|e| match e {
                    Event::Message { data, .. } => data,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                texts,
                [Bytes::from(big.clone()), Bytes::from_static(b"small")]
            );
        }
        assert_eq!(
            SubscriberDeflate::new(
                &DeflateParams {
                    server_max_window_bits: Some(8),
                    ..DeflateParams::default()
                },
                0
            ),
            None,
            "a window of 8 bits gets plain frames"
        );
    }

    #[test]
    fn encode_is_a_server_frame() {
        let b = encode(MessageKind::Text, b"hi");
        assert_eq!(&b[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(
            encode(MessageKind::Binary, &[0; 200])[..4],
            [0x82, 126, 0, 200]
        );
    }
}

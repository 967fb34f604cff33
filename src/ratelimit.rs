//! Token buckets for the abuse limits (accept rate, per-connection message and byte rates).
//!
//! Runtime-free: the caller passes the time. A bucket holds at most one second's worth of
//! tokens (the burst) and refills continuously at its rate.

use std::time::Instant;

/// A token bucket refilled at `rate` tokens per second, holding at most `rate` tokens (and
/// at least one, so a rate below 1/s still admits).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, now: Instant) -> Self {
        let capacity = rate.max(1.0);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Take `n` tokens if the bucket holds them (after refilling up to `now`).
    pub fn take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Which per-connection limit a connection exceeded. Metric label `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateExceeded {
    /// `max_messages_per_second`.
    Messages,
    /// `max_bytes_per_second`.
    Bytes,
}

impl RateExceeded {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Bytes => "bytes",
        }
    }
}

/// The inbound limits of one connection.
#[derive(Debug, Clone)]
pub struct MessageLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl MessageLimiter {
    /// `None` when neither limit is set.
    pub fn new(messages: Option<u32>, bytes: Option<u64>, now: Instant) -> Option<Self> {
        (messages.is_some() || bytes.is_some()).then(|| Self {
            messages: messages.map(|r| TokenBucket::new(f64::from(r), now)),
            bytes: bytes.map(|r| TokenBucket::new(r as f64, now)),
        })
    }

    /// Account one message of `len` payload bytes.
    ///
    /// # Errors
    /// The limit it exceeds.
    pub fn admit(&mut self, len: usize, now: Instant) -> Result<(), RateExceeded> {
        if let Some(b) = &mut self.messages {
            if !b.take(1.0, now) {
                return Err(RateExceeded::Messages);
            }
        }
        if let Some(b) = &mut self.bytes {
            // A message larger than the whole budget can never pass: count it as exceeding.
            if !b.take(len as f64, now) {
                return Err(RateExceeded::Bytes);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_allow_a_second_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        assert!((0..10).all(|_| b.take(1.0, t0)));
        assert!(!b.take(1.0, t0), "burst used up");
        assert!(b.take(1.0, t0 + Duration::from_millis(100)), "refilled one");
        assert!(!b.take(1.0, t0 + Duration::from_millis(100)));
        assert!(
            b.take(10.0, t0 + Duration::from_secs(60)),
            "capped at one second"
        );
        assert!(!b.take(1.0, t0 + Duration::from_secs(60)));
        let mut slow = TokenBucket::new(0.5, t0);
        assert!(slow.take(1.0, t0), "a sub-1/s rate still admits one");
        assert!(!slow.take(1.0, t0 + Duration::from_secs(1)));
        assert!(slow.take(1.0, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn limiter_names_the_limit() {
        let t0 = Instant::now();
        assert!(MessageLimiter::new(None, None, t0).is_none());
        let mut l = MessageLimiter::new(Some(2), Some(100), t0).unwrap();
        assert_eq!(l.admit(10, t0), Ok(()));
        assert_eq!(l.admit(95, t0), Err(RateExceeded::Bytes));
        assert_eq!(l.admit(1, t0), Err(RateExceeded::Messages));
    }
}

//! Log lines for errors that repeat: the first one at once, then at most one per
//! interval, each saying how many were left out since the last.

use std::time::{Duration, Instant};

pub struct Repeated {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Repeated {
    pub const fn new(every: Duration) -> Repeated {
        Repeated {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence. `Some(n)`: log it now, and say that `n` like it were
    /// left out since the last line; `None`: leave this one out.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now < t + self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `" (N more like it since the last)"`, or nothing.
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it since the last)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_at_once_then_one_per_interval_with_a_count() {
        let mut r = Repeated::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.note(t), Some(0));
        assert_eq!(r.note(t + Duration::from_secs(1)), None);
        assert_eq!(r.note(t + Duration::from_secs(2)), None);
        assert_eq!(r.note(t + Duration::from_secs(10)), Some(2));
        assert_eq!(r.note(t + Duration::from_secs(11)), None);
    }
}

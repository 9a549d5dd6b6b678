//! `--workers N` or `--workers MIN..MAX`.

/// `--workers`: a fixed count, or bounds to adapt within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerCount {
    pub min: usize,
    pub max: usize,
}

impl WorkerCount {
    /// `4`, or `2..16`.
    pub fn parse(s: &str) -> Result<WorkerCount, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("expected N or MIN..MAX (whole numbers), got {s:?}"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(s)?;
                (n, n)
            }
        };
        if min > max {
            return Err(format!("{s}: MIN is more than MAX"));
        }
        Ok(WorkerCount { min, max })
    }

    /// Bounds to adapt within; `None` for a fixed count.
    pub fn range(self) -> Option<WorkerCount> {
        (self.min < self.max).then_some(self)
    }
}

impl std::fmt::Display for WorkerCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

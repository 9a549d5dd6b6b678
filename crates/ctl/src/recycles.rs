//! The status header's line on recycling: `--max-requests` and the recycles so far.

use std::fmt::Write as _;

use arbiter_proto::status::Status;

/// `max-requests: N +0..J per worker` and the recycles so far; the workers
/// that do not count requests (never recycled by count) are `n/a`.
pub fn line(st: &Status, out: &mut String) {
    let m = &st.master;
    let total: u64 = m.recycles.values().sum();
    if m.max_requests.is_none() && total == 0 {
        return;
    }
    let mut parts = Vec::new();
    if let Some(mr) = &m.max_requests {
        let uncounted: Vec<String> = st
            .workers
            .iter()
            .filter(|w| w.requests.is_none())
            .map(|w| w.id.to_string())
            .collect();
        let mut p = format!("max-requests: {}", mr.limit);
        if mr.jitter > 0 {
            let _ = write!(p, " +0..{} per worker", mr.jitter);
        }
        if !uncounted.is_empty() && uncounted.len() == st.workers.len() {
            p.push_str(", n/a for every worker (none counts requests)");
        } else if !uncounted.is_empty() {
            let _ = write!(p, ", n/a for worker {}", uncounted.join(", "));
        }
        parts.push(p);
    }
    let reasons: Vec<String> = m
        .recycles
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(why, n)| format!("{n} {why}"))
        .collect();
    parts.push(if reasons.is_empty() {
        "0 recycled".to_string()
    } else {
        format!("{total} recycled ({})", reasons.join(", "))
    });
    let _ = writeln!(out, "{}", parts.join("; "));
}

#[cfg(test)]
mod tests {
    use crate::render::tests::fixture;
    use arbiter_proto::status::MaxRequests;

    #[test]
    fn says_which_workers_are_not_counted() {
        let mut st = fixture();
        let mut out = String::new();
        super::line(&st, &mut out);
        assert_eq!(out, "", "nothing configured, nothing recycled");
        st.master.max_requests = Some(MaxRequests {
            limit: 40,
            jitter: 10,
        });
        st.master.recycles.insert("max-requests".into(), 3);
        st.master.recycles.insert("asked".into(), 0);
        for w in &mut st.workers {
            w.requests = None;
        }
        st.workers[0].requests = Some(12);
        st.workers[0].max_requests = Some(45);
        let ids: Vec<String> = st.workers[1..].iter().map(|w| w.id.to_string()).collect();
        super::line(&st, &mut out);
        assert_eq!(
            out,
            format!(
                "max-requests: 40 +0..10 per worker, n/a for worker {}; 3 recycled (3 max-requests)\n",
                ids.join(", ")
            )
        );
        for w in &mut st.workers {
            w.requests = None;
        }
        st.master.recycles.clear();
        out.clear();
        super::line(&st, &mut out);
        assert_eq!(
            out,
            "max-requests: 40 +0..10 per worker, n/a for every worker (none counts requests); 0 recycled\n"
        );
    }
}

#![no_main]
//! parse_bind on arbitrary UTF-8: no panic; errors name the input; what parses
//! reads back equal from its Display. Inputs that would need a DNS look-up are
//! skipped (parse_bind resolves host names; see bench/reliability-fuzz.md).
use arbiter_daemon::config::{BindSpec, parse_bind};
use libfuzzer_sys::fuzz_target;

fn needs_dns(s: &str) -> bool {
    if s.starts_with("unix:") || s.starts_with("fd://") {
        return false;
    }
    let hp = s.strip_prefix("tcp://").unwrap_or(s);
    let (host, port) = if let Some(rest) = hp.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (
                h,
                p.strip_prefix(':')
                    .unwrap_or(if p.is_empty() { "8000" } else { p }),
            ),
            None => return false,
        }
    } else {
        hp.rsplit_once(':').unwrap_or((hp, "8000"))
    };
    if port.parse::<u16>().is_err() || host.is_empty() {
        return false;
    }
    host.parse::<std::net::IpAddr>().is_err()
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if needs_dns(s) {
        return;
    }
    match parse_bind(s) {
        Ok(spec) => {
            // Known finding: Unix paths starting with "//" do not round-trip.
            if matches!(&spec, BindSpec::Unix(p) if p.to_string_lossy().starts_with("//")) {
                return;
            }
            assert_eq!(parse_bind(&spec.to_string()).unwrap(), spec);
        }
        Err(e) => assert!(e.0.starts_with("--bind ") && e.0.contains(s)),
    }
});

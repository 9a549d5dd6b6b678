#![no_main]
//! parse_bind_form (parse_bind without its DNS look-up) on arbitrary UTF-8: no
//! panic; errors name the input; a spec reads back equal from its Display; a host
//! name is never an IP literal.
use arbiter_daemon::config::{BindForm, parse_bind, parse_bind_form};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_bind_form(s) {
        Ok(BindForm::Spec(spec)) => assert_eq!(parse_bind(&spec.to_string()).unwrap(), spec),
        Ok(BindForm::Host(host, _)) => {
            assert!(!host.is_empty() && host.parse::<std::net::IpAddr>().is_err())
        }
        Err(e) => assert!(e.0.starts_with("--bind ") && e.0.contains(s)),
    }
});

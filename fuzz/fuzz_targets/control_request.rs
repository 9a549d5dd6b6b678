#![no_main]
//! parse_request on arbitrary bytes: no panic; what parses round-trips; errors are
//! well-formed BadRequest/UnsupportedVersion responses.
use arbiter_proto::control::{ErrorKind, RequestEnvelope, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            let again = serde_json::to_vec(&RequestEnvelope::new(req.clone())).unwrap();
            assert_eq!(parse_request(&again).unwrap(), req);
        }
        Err(resp) => {
            assert!(!resp.ok && resp.reply.is_none());
            let e = resp.error.expect("error body");
            assert!(matches!(
                e.kind,
                ErrorKind::BadRequest | ErrorKind::UnsupportedVersion
            ));
        }
    }
});

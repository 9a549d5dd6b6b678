//! gunicorn's control-socket framing (`gunicornc`): a 4-byte big-endian length, then
//! a JSON message. Not translated yet: such a client gets one framed error saying so.

/// A framed error telling a gunicornc client this master does not speak it yet.
pub fn not_supported() -> Vec<u8> {
    let body =
        br#"{"status":"error","error":"gunicornc framing is not supported by this arbiterd yet"}"#;
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

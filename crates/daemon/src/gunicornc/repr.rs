//! How Python writes values: what gunicorn's answers and error texts look like
//! byte for byte.

use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_json::ser::Formatter;
use std::io;

/// Python's `str()` of a JSON value (what gunicorn does to each of `args`).
pub(super) fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => py_float(f),
            _ => n.to_string(),
        },
        // Python would print a repr; only ever compared, never executed.
        other => other.to_string(),
    }
}

/// Python's `repr()` of a string, near enough for error messages.
pub(super) fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\x7f' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A JSON value whose object keys stay in the order given: gunicorn's answers list
/// their fields in a fixed order, and `serde_json::Value` sorts keys unless its
/// `preserve_order` feature is on, which would reorder every other crate's JSON
/// too.
#[derive(Clone, Debug)]
pub(super) enum J {
    Null,
    Bool(bool),
    Int(i128),
    /// Not finite: written `null`, where Python would write `NaN`, which is not
    /// JSON.
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
    /// A value from the request (its `id`), echoed as it came, its object keys
    /// sorted.
    Echo(Value),
}

impl J {
    pub(super) fn str(s: impl Into<String>) -> J {
        J::Str(s.into())
    }

    pub(super) fn uint(n: u64) -> J {
        J::Int(i128::from(n))
    }

    /// Written as Python's `json.dumps` with its defaults writes it.
    pub(super) fn write(&self, out: &mut String) {
        let mut bytes = Vec::new();
        let mut ser = serde_json::Serializer::with_formatter(&mut bytes, PyJson);
        // Neither can fail: the writer is a Vec and every key is a string.
        if self.serialize(&mut ser).is_ok() {
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
}

impl Serialize for J {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::Null => s.serialize_unit(),
            J::Bool(b) => s.serialize_bool(*b),
            J::Int(i) => s.serialize_i128(*i),
            J::Float(f) => s.serialize_f64(*f),
            J::Str(t) => s.serialize_str(t),
            J::Arr(items) => s.collect_seq(items),
            J::Obj(fields) => s.collect_map(fields.iter().map(|(k, v)| (k, v))),
            J::Echo(v) => v.serialize(s),
        }
    }
}

pub(super) fn obj<const N: usize>(fields: [(&str, J); N]) -> J {
    J::Obj(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// The layout of Python's `json.dumps` with its defaults, which gunicorn uses:
/// `", "` and `": "` between items, floats as Python's `repr`, and
/// `ensure_ascii`: what is not ASCII as `\uXXXX` escapes (a surrogate pair
/// beyond the BMP). serde_json already escapes quotes, backslashes and control
/// characters as Python does (short forms for `\b\f\n\r\t`, lowercase hex for
/// the rest); like serde_json, and unlike Python, DEL (0x7f) is left as it is.
struct PyJson;

impl Formatter for PyJson {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(py_float(value).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut ascii_from = 0;
        for (i, c) in fragment.char_indices() {
            if !c.is_ascii() {
                w.write_all(&fragment.as_bytes()[ascii_from..i])?;
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
                ascii_from = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[ascii_from..])
    }
}

/// Python's `repr(float)`, near enough: `30.0`, `0.01`, `1e-07`.
pub(super) fn py_float(f: f64) -> String {
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

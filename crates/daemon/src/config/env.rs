//! The workers' environment from the configuration: `env-file = PATH` (systemd's
//! `EnvironmentFile=` syntax), the file's `[env]` table and `--env KEY=VALUE`, in
//! that order, a later one winning. Read at start and at every reload, so a new
//! generation gets what the files say then.

use std::path::Path;

/// A key the master sets for each child itself: overriding it would break the
/// worker contract (fds, readiness, heartbeats).
pub fn is_reserved(key: &[u8]) -> bool {
    key.starts_with(b"LISTEN_")
        || key.starts_with(b"ARBITER_")
        || key == b"NOTIFY_SOCKET"
        || key.starts_with(b"WATCHDOG_")
}

/// A key `where` names, refused if it is no variable name or one of ours.
pub fn check_key(key: &str, whence: &str) -> Result<(), String> {
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{whence}: {key:?} is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    if is_reserved(key.as_bytes()) {
        return Err(format!(
            "{whence}: {key} is set by the master for each worker and cannot be overridden"
        ));
    }
    Ok(())
}

/// `--env KEY=VALUE`.
pub fn parse_flag(arg: &str) -> Result<(String, String), String> {
    let Some((k, v)) = arg.split_once('=') else {
        return Err(format!("--env {arg:?}: expected KEY=VALUE"));
    };
    check_key(k, "--env")?;
    Ok((k.to_string(), v.to_string()))
}

/// An env-file's `KEY=VALUE` lines: blank lines and `#` or `;` comments skipped,
/// an optional `export `, the value optionally in single or double quotes (in
/// double quotes, `\"` and `\\` escape). A bad line is an error with its number.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let whence = format!("env-file {} line {}", path.display(), n + 1);
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("{whence}: expected KEY=VALUE, found {raw:?}"));
        };
        let k = k.trim_end();
        check_key(k, &whence)?;
        out.push((k.to_string(), unquote(v.trim(), &whence)?));
    }
    Ok(out)
}

fn unquote(v: &str, whence: &str) -> Result<String, String> {
    let unterminated = || Err(format!("{whence}: a quote is not closed"));
    if let Some(inner) = v.strip_prefix('\'') {
        return match inner.strip_suffix('\'') {
            Some(s) => Ok(s.to_string()),
            None => unterminated(),
        };
    }
    let Some(inner) = v.strip_prefix('"') else {
        return Ok(v.to_string());
    };
    let mut s = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.as_str().trim().is_empty() => return Ok(s),
            '"' => return Err(format!("{whence}: text after the closing quote")),
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\' | '$' | '`')) => s.push(e),
                Some('n') => s.push('\n'),
                Some(e) => {
                    s.push('\\');
                    s.push(e);
                }
                None => return unterminated(),
            },
            c => s.push(c),
        }
    }
    unterminated()
}

/// The workers' variables from an env-file, the `[env]` table and `--env`
/// flags, each checked, merged in that order.
pub fn for_workers(
    file: Option<&Path>,
    table: &[(String, String)],
    flags: &[String],
) -> Result<Vec<(String, String)>, String> {
    let from_file = match file {
        Some(path) => {
            let text = crate::userpath::read_to_string(path, crate::userpath::CONFIG_LIMIT)
                .map_err(|e| format!("env-file {}: {e}", path.display()))?;
            parse_file(path, &text)?
        }
        None => Vec::new(),
    };
    for (k, _) in table {
        check_key(k, "[env]")?;
    }
    let flags = flags
        .iter()
        .map(|a| parse_flag(a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(merge([from_file, table.to_vec(), flags]))
}

/// The three sources in order, a later key replacing an earlier one in place.
pub fn merge(sources: [Vec<(String, String)>; 3]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in sources.into_iter().flatten() {
        match out.iter_mut().find(|(have, _)| *have == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_syntax() {
        let p = Path::new("/x.env");
        let got = parse_file(
            p,
            "# c\n\n; c\nA=1\nexport B = two words\nC=\"q \\\"x\\\" \\\\\"\nD='$HOME'\nE=\n",
        )
        .unwrap();
        let want = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "q \"x\" \\"),
            ("D", "$HOME"),
            ("E", ""),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        let e = parse_file(p, "A=1\nnot a line\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("KEY=VALUE"), "{e}");
        let e = parse_file(p, "A=\"open\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("quote"), "{e}");
        let e = parse_file(p, "LISTEN_FDS=9\n").unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("cannot be overridden"),
            "{e}"
        );
        let e = parse_file(p, "1A=x\n").unwrap_err();
        assert!(e.contains("not a variable name"), "{e}");
    }

    #[test]
    fn later_sources_win_in_place() {
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        let got = merge([
            vec![kv("A", "file"), kv("B", "file")],
            vec![kv("B", "table")],
            vec![kv("A", "flag"), kv("C", "flag")],
        ]);
        assert_eq!(
            got,
            vec![kv("A", "flag"), kv("B", "table"), kv("C", "flag")]
        );
        assert!(parse_flag("NOTIFY_SOCKET=/x").is_err());
        assert!(parse_flag("NOEQUALS").is_err());
        assert_eq!(parse_flag("K=a=b").unwrap(), kv("K", "a=b"));
    }
}

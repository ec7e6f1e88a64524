//! Templates (`{field}`, with `{{`/`}}` as literal braces), filter conditions and the small
//! string helpers steps use (globs, cutting content at a UTF-8 boundary).

use super::Condition;

/// The `{field}` references of a template; `{{` and `}}` are literal braces.
pub fn template_fields(t: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
            b'{' => {
                let end = t[i + 1..].find('}').ok_or_else(|| format!("template {t:?} has an unclosed '{{'"))?;
                let field = t[i + 1..i + 1 + end].trim();
                if field.is_empty() {
                    return Err(format!("template {t:?} has an empty '{{}}'"));
                }
                out.push(field);
                i += end + 2;
            }
            b'}' => return Err(format!("template {t:?} has a '}}' without '{{'")),
            _ => i += 1,
        }
    }
    Ok(out)
}

/// Fills a template from `lookup`; a field that does not exist is an error (named).
pub fn render(t: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let b = t.as_bytes();
    let mut i = 0;
    let mut literal_from = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => {
                out.push_str(&t[literal_from..i]);
                out.push('{');
                i += 2;
                literal_from = i;
            }
            b'}' if b.get(i + 1) == Some(&b'}') => {
                out.push_str(&t[literal_from..i]);
                out.push('}');
                i += 2;
                literal_from = i;
            }
            b'{' => {
                out.push_str(&t[literal_from..i]);
                let end = t[i + 1..].find('}').ok_or_else(|| format!("template {t:?} has an unclosed '{{'"))?;
                let field = t[i + 1..i + 1 + end].trim();
                let value = lookup(field).ok_or_else(|| format!("{field} has no value"))?;
                out.push_str(&value);
                i += end + 2;
                literal_from = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&t[literal_from..]);
    Ok(out)
}

/// Evaluates a filter condition.
pub fn holds(c: &Condition, value: Option<&str>) -> bool {
    if let Some(want) = c.exists {
        return value.is_some() == want;
    }
    let Some(v) = value else { return false };
    if let Some(e) = &c.equals {
        return v == e;
    }
    if let Some(e) = &c.not_equals {
        return v != e;
    }
    if let Some(p) = &c.matches {
        return glob(p, v);
    }
    false
}

/// Glob with `*` only.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// Cuts `bytes` to at most `max` bytes at a UTF-8 boundary (bytes that are not UTF-8 are cut
/// exactly).
pub fn head(bytes: &[u8], max: usize) -> &[u8] {
    if bytes.len() <= max {
        return bytes;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &bytes[..end]
        }
        Err(_) => &bytes[..max],
    }
}

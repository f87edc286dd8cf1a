//! The one-line setting shorthand of the layer table's "Set selected" field: `w4g32`, `gptq w4g128 act`,
//! `sparsegpt 2:4 w4g128`, `magnitude 50%`, `rtn w8`, `dense`. Typing a setting is faster than four combo boxes when
//! many rows change at once, and the same words label every row, so what the table shows can be typed back.
//! A spec becomes a plan [`Rule`] with its `modules` left empty; the plan resolver stays the one judge of validity.

use whittle_core::compress::Method;
use whittle_core::plan::{parse_nm, Rule};

/// Parses a shorthand into a rule. Tokens are separated by spaces, `+` or `,`.
pub fn parse(spec: &str) -> Result<Rule, String> {
    let mut rule = Rule::default();
    let tokens: Vec<String> = spec
        .split(|c: char| c.is_whitespace() || c == '+' || c == ',')
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if tokens.is_empty() {
        return Err("type a setting, e.g. w4g32, 2:4, 50%, gptq w4g128 or dense".into());
    }
    for t in &tokens {
        parse_token(t, &mut rule).map_err(|e| format!("`{t}`: {e}"))?;
    }
    Ok(rule)
}

fn parse_token(t: &str, rule: &mut Rule) -> Result<(), String> {
    if let Some(m) = method(t) {
        rule.method = Some(m);
        return Ok(());
    }
    match t {
        "dense" => rule.keep_dense = Some(true),
        "sym" => rule.sym = Some(true),
        "asym" => rule.sym = Some(false),
        "act" | "act_order" | "actorder" => rule.act_order = Some(true),
        "ch" | "g-1" => rule.group = Some(-1),
        _ if t.contains(':') => {
            parse_nm(t)?;
            rule.nm = Some(t.to_string());
        }
        _ if t.ends_with('%') => rule.sparsity = Some(percent(&t[..t.len() - 1])?),
        _ if t.starts_with('s') && t[1..].starts_with(|c: char| c.is_ascii_digit()) => {
            let v: f32 = t[1..].parse().map_err(|_| "expected s50 or s0.5 for 50% sparsity".to_string())?;
            rule.sparsity = Some(if v >= 1.0 { v / 100.0 } else { v });
        }
        _ if t.starts_with('w') => {
            let rest = &t[1..];
            let (bits, group) = match rest.split_once('g') {
                Some((b, g)) => (b, Some(g)),
                None => (rest, None),
            };
            rule.bits = Some(bits.parse().map_err(|_| "expected w<bits>, e.g. w4 or w4g128".to_string())?);
            if let Some(g) = group {
                rule.group = Some(group_size(g)?);
            }
        }
        _ if t.starts_with('g') => rule.group = Some(group_size(&t[1..])?),
        _ => return Err("unknown word (expected e.g. w4g32, g128, 2:4, 50%, gptq, sparsegpt, rtn, magnitude, obc, dense, asym, act)".into()),
    }
    Ok(())
}

fn method(t: &str) -> Option<Method> {
    Some(match t {
        "gptq" => Method::Gptq,
        "sparsegpt" => Method::SparseGpt,
        "rtn" => Method::Rtn,
        "magnitude" => Method::Magnitude,
        "obc" => Method::Obc,
        _ => return None,
    })
}

fn group_size(g: &str) -> Result<i64, String> {
    if g == "ch" || g == "-1" {
        return Ok(-1);
    }
    g.parse().map_err(|_| "expected a group size, e.g. g128 (or gch for per-channel)".to_string())
}

fn percent(p: &str) -> Result<f32, String> {
    p.parse::<f32>().map(|v| v / 100.0).map_err(|_| "expected a percentage, e.g. 50%".to_string())
}

/// The shorthand of a rule, the inverse of [`parse`] for the fields the table shows.
pub fn describe(rule: &Rule) -> String {
    if rule.keep_dense == Some(true) {
        return "dense".into();
    }
    let mut parts = Vec::new();
    if let Some(m) = rule.method {
        parts.push(m.to_string());
    }
    if let Some(nm) = &rule.nm {
        parts.push(nm.clone());
    }
    if let Some(s) = rule.sparsity.filter(|s| *s > 0.0) {
        parts.push(format!("{}%", (s * 100.0).round()));
    }
    if let Some(b) = rule.bits {
        parts.push(match rule.group {
            Some(g) if g > 0 => format!("w{b}g{g}"),
            _ => format!("w{b}"),
        });
    }
    if rule.sym == Some(false) {
        parts.push("asym".into());
    }
    if rule.act_order == Some(true) {
        parts.push("act".into());
    }
    if parts.is_empty() {
        "dense".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_settings_parse() {
        let r = parse("w4g32").unwrap();
        assert_eq!((r.bits, r.group, r.method), (Some(4), Some(32), None));
        let r = parse("sparsegpt 2:4 + w4g128").unwrap();
        assert_eq!((r.method, r.nm.as_deref(), r.bits, r.group), (Some(Method::SparseGpt), Some("2:4"), Some(4), Some(128)));
        assert_eq!(parse("magnitude 50%").unwrap().sparsity, Some(0.5));
        assert_eq!(parse("s0.3").unwrap().sparsity, Some(0.3));
        assert_eq!(parse("rtn w8 gch asym").unwrap().group, Some(-1));
        assert_eq!(parse("dense").unwrap().keep_dense, Some(true));
    }

    #[test]
    fn describe_round_trips() {
        for s in ["w4g32", "gptq w4g128 act", "sparsegpt 2:4 w4g128", "magnitude 50%", "rtn w8 asym", "dense"] {
            assert_eq!(describe(&parse(s).unwrap()), s);
        }
    }

    #[test]
    fn mistakes_name_the_word() {
        let e = parse("w4g32 foo").unwrap_err();
        assert!(e.starts_with("`foo`"), "{e}");
        assert!(parse("wx").unwrap_err().contains("w<bits>"));
        assert!(parse("2-4").is_err());
        assert!(parse("  ").is_err());
    }
}

//! Number formatting shared by the panes, so a size or an error reads the same in every table and tooltip.

use std::time::Duration;

/// `260.4k`, `6.74B`.
pub fn count(n: usize) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n}"),
    }
}

/// `1.05 MB`, `3.80 GB` (decimal units, as disk sizes are shown).
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// `under 1 s`, `3 s`, `2 min 05 s`, `9 h 07 min`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 && !d.is_zero() {
        "under 1 s".into()
    } else if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, s % 3600 / 60)
    }
}

/// Relative errors span orders of magnitude: scientific notation.
pub fn error(e: f64) -> String {
    if e == 0.0 {
        "0".into()
    } else {
        format!("{e:.2e}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn units() {
        assert_eq!(super::count(260_416), "260.4k");
        assert_eq!(super::bytes(1_048_576), "1.05 MB");
        assert_eq!(super::duration(std::time::Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(super::duration(std::time::Duration::from_millis(300)), "under 1 s");
        assert_eq!(super::duration(std::time::Duration::from_secs(9 * 3600 + 7 * 60 + 59)), "9 h 07 min");
        assert_eq!(super::error(0.00123), "1.23e-3");
    }
}

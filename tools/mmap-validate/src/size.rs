//! Parsing of byte counts such as `1048576`, `4K`, `5M`, `6GiB`, `1t`.

/// Parses a byte count: plain decimal digits, optionally followed by a
/// binary suffix `K`, `M`, `G` or `T` (powers of 1024; case-insensitive;
/// `KiB`-style spellings are accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number of bytes, e.g. 1048576, 4K, 5M, 6G"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {suffix:?} (use K, M, G or T, powers of 1024)"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: number too large"))
}

/// Parses a page size: like [`parse_size`], but it must be non-zero.
pub fn parse_page_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("page size must be at least 1 byte".to_owned()),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("12b"), Ok(12));
    }

    #[test]
    fn suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("5M"), Ok(5 << 20));
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("1KB").is_err());
        assert!(parse_size("1 K").is_err());
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216T").is_err());
        assert_eq!(parse_size("16777215T"), Ok(16_777_215u64 << 40));
    }

    #[test]
    fn page_size_non_zero() {
        assert_eq!(parse_page_size("4096"), Ok(4096));
        assert_eq!(parse_page_size("64K"), Ok(65536));
        assert!(parse_page_size("0").is_err());
    }
}

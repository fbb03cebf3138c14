//! Byte quantities as users write them on the command line.
//!
//! Accepts a plain byte count (`1073741824`) or a Kubernetes-style quantity
//! with a binary (`Ki Mi Gi Ti Pi Ei`) or decimal (`k M G T P E`) suffix, the
//! forms a PVC's `resources.requests.storage` uses.

/// Parses a byte quantity; the error says what was wrong and what is accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size; give a byte count or a quantity such as 512Mi, 1Gi, 1Ti".into());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "size {s:?} does not start with a number; use e.g. 512Mi, 1Gi, 1Ti"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?} is too large"))?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!(
                "size {s:?} has unknown suffix {other:?}; use Ki, Mi, Gi, Ti, Pi, Ei (binary) or k, M, G, T, P, E (decimal)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn quantities() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
    }

    #[test]
    fn bad_quantities_say_why() {
        assert!(parse_size("").unwrap_err().contains("empty"));
        assert!(parse_size("Gi").unwrap_err().contains("number"));
        assert!(parse_size("1Gb").unwrap_err().contains("suffix"));
        assert!(parse_size("16Ei").unwrap_err().contains("64 bits"));
        assert!(parse_size("1.5Gi").unwrap_err().contains("suffix"));
    }
}

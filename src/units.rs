//! Byte quantities as users write them on the command line, and the range
//! check every layer applies to I/O requests.
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

/// Why an I/O request's range is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentError {
    /// Offset or length not a multiple of the alignment, or length zero.
    Misaligned,
    /// The range reaches past the end of the volume.
    PastEnd,
}

/// Checks that `[offset, offset+len)` is a non-empty, `align`-aligned range
/// inside a volume of `size` bytes. The one rule every layer applies to I/O
/// before touching anything.
pub fn check_extent(offset: u64, len: u64, size: u64, align: u64) -> Result<(), ExtentError> {
    if offset % align != 0 || len % align != 0 || len == 0 {
        return Err(ExtentError::Misaligned);
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ExtentError::PastEnd),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_extent, parse_size, ExtentError};

    #[test]
    fn extents_are_checked_for_alignment_and_end() {
        assert_eq!(check_extent(4096, 4096, 8192, 4096), Ok(()));
        assert_eq!(
            check_extent(512, 4096, 8192, 4096),
            Err(ExtentError::Misaligned)
        );
        assert_eq!(check_extent(0, 0, 8192, 4096), Err(ExtentError::Misaligned));
        assert_eq!(
            check_extent(4096, 8192, 8192, 4096),
            Err(ExtentError::PastEnd)
        );
        assert_eq!(
            check_extent(u64::MAX - 4095, 8192, u64::MAX, 4096),
            Err(ExtentError::PastEnd)
        );
        assert_eq!(
            check_extent(1 << 63, 1 << 63, u64::MAX, 4096),
            Err(ExtentError::PastEnd)
        );
    }

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

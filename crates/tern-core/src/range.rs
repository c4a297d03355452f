//! HTTP `Range` requests (RFC 9110 §14): the one form a repository serves, a single byte
//! range, parsed from an untrusted header.

/// The inclusive byte range `bytes=…` asks for in a resource of `len` bytes; `None` when
/// the header is malformed, asks for several ranges, or for nothing the resource holds
/// (the server answers 416 with the resource's length).
pub fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let spec = header.strip_prefix("bytes=")?.trim();
    let (a, b) = spec.split_once('-')?;
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let last = len.checked_sub(1)?;
    if a.trim().is_empty() {
        // `bytes=-N`: the last N bytes; `-0` asks for none of them.
        let suffix = number(b)?;
        if suffix == 0 {
            return None;
        }
        return Some((len.saturating_sub(suffix), last));
    }
    let start = number(a)?;
    let end = if b.trim().is_empty() {
        last
    } else {
        number(b)?.min(last)
    };
    (start <= end && start < len).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn single_ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=90-200", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-200", 100), Some((0, 99)));
    }

    #[test]
    fn unsatisfiable_or_malformed() {
        for h in [
            "bytes=-0",
            "bytes=100-",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "bytes=a-b",
            "bytes=-",
            "bytes=--1",
            "items=0-1",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(parse_range(h, 100), None, "{h}");
        }
        assert_eq!(parse_range("bytes=0-", 0), None);
    }
}

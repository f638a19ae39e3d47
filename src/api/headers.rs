//! Header rules: merging `Accept`, parsing `Range`, building and parsing `Content-Range`.

use http::HeaderMap;
use http::header::ACCEPT;

/// All media types a client accepts, merged from every `Accept` header line (Go's client,
/// skopeo and podman send several), in first-seen order, without duplicates or parameters.
pub fn merged_accept(headers: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let essence = item.split(';').next().unwrap_or("").trim();
            if !essence.is_empty() && !out.iter().any(|m| m.eq_ignore_ascii_case(essence)) {
                out.push(essence.to_string());
            }
        }
    }
    out
}

/// What a `Range` header asks of a body of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable single range: serve the whole body with 200 (RFC 9110 lets a server ignore
    /// malformed or multi-part ranges).
    Full,
    /// Serve bytes `start..end` (end exclusive) with 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// The syntax of a single `bytes=` range, before the body size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-` or `bytes=a-b` (b inclusive).
    From { start: u64, last: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix { len: u64 },
}

/// Parses a `Range` header. `None` means "ignore it" (absent, malformed, not bytes, or several
/// ranges).
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        return Some(ByteRange::Suffix { len: num(b)? });
    }
    let start = num(a)?;
    let last = if b.is_empty() { None } else { Some(num(b)?) };
    if let Some(last) = last
        && last < start
    {
        return None;
    }
    Some(ByteRange::From { start, last })
}

impl ByteRange {
    /// Resolves the range against a body of `size` bytes.
    pub fn resolve(self, size: u64) -> RangeRequest {
        match self {
            ByteRange::From { start, last } => {
                if start >= size {
                    return RangeRequest::Unsatisfiable;
                }
                let end = last.map_or(size, |l| l.saturating_add(1).min(size));
                RangeRequest::Partial { start, end }
            }
            ByteRange::Suffix { len } => {
                if len == 0 || size == 0 {
                    return RangeRequest::Unsatisfiable;
                }
                RangeRequest::Partial {
                    start: size.saturating_sub(len),
                    end: size,
                }
            }
        }
    }
}

/// `Content-Range` for a 206: `bytes start-last/size`.
pub fn content_range(start: u64, end: u64, size: u64) -> String {
    format!("bytes {start}-{}/{size}", end - 1)
}

/// `Content-Range` for a 416: `bytes */size`.
pub fn unsatisfied_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// A `Content-Range` header an upstream sent (RFC 9110 §14.4), parsed once here so every
/// reader of upstream replies agrees on what a valid one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes first-last/total` of a 206: bytes `first..=last`, of a body of `total` bytes
    /// (`None` when the sender wrote `*`: it does not know the size).
    Bytes {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    /// `bytes */total` of a 416: no bytes, but the size.
    Unsatisfied { total: u64 },
}

impl ContentRange {
    /// Parses a `Content-Range` value. `None` for anything but a single well-formed `bytes`
    /// range: another unit, a missing part, a number that overflows `u64`, `last < first`, or
    /// a total that does not lie past `last` (RFC 9110 calls those invalid).
    pub fn parse(value: &str) -> Option<ContentRange> {
        let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
        // Only digits: `u64::from_str` would also take a leading `+`.
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                None
            } else {
                s.parse().ok()
            }
        };
        let total = match total {
            "*" => None,
            n => Some(num(n)?),
        };
        if range == "*" {
            return Some(ContentRange::Unsatisfied { total: total? });
        }
        let (first, last) = range.split_once('-')?;
        let (first, last) = (num(first)?, num(last)?);
        if last < first || total.is_some_and(|t| t <= last) {
            return None;
        }
        Some(ContentRange::Bytes { first, last, total })
    }

    /// The full body size, if the header names it. Some upstreams answer a blob HEAD without
    /// a length; a one-byte range GET tells the size this way.
    pub fn total(self) -> Option<u64> {
        match self {
            ContentRange::Bytes { total, .. } => total,
            ContentRange::Unsatisfied { total } => Some(total),
        }
    }
}

/// `Retry-After` in seconds (HTTP dates are rare from registries and fall back to `None`).
pub fn retry_after_secs(value: &str) -> Option<u64> {
    value.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn merges_accept_lines() {
        let mut h = HeaderMap::new();
        h.append(ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json;q=0.9"));
        h.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        h.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        let m = merged_accept(&h);
        assert_eq!(
            m,
            vec![
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json"
            ]
        );
        let mut reversed = m.clone();
        reversed.reverse();
        // Tag answers are kept per class of this set (`oci::media_types::AcceptClass`).
        assert_eq!(
            crate::oci::media_types::AcceptClass::of(&m),
            crate::oci::media_types::AcceptClass::of(&reversed)
        );
    }

    #[test]
    fn ranges() {
        let r = |s: &str, size| parse_range(s).map(|r| r.resolve(size));
        assert_eq!(
            r("bytes=0-9", 100),
            Some(RangeRequest::Partial { start: 0, end: 10 })
        );
        assert_eq!(
            r("bytes=90-", 100),
            Some(RangeRequest::Partial {
                start: 90,
                end: 100
            })
        );
        assert_eq!(
            r("bytes=90-1000", 100),
            Some(RangeRequest::Partial {
                start: 90,
                end: 100
            })
        );
        assert_eq!(
            r("bytes=-10", 100),
            Some(RangeRequest::Partial {
                start: 90,
                end: 100
            })
        );
        assert_eq!(
            r("bytes=-1000", 100),
            Some(RangeRequest::Partial { start: 0, end: 100 })
        );
        assert_eq!(r("bytes=100-", 100), Some(RangeRequest::Unsatisfiable));
        assert_eq!(r("bytes=-0", 100), Some(RangeRequest::Unsatisfiable));
        assert_eq!(r("bytes=0-", 0), Some(RangeRequest::Unsatisfiable));
        for ignored in [
            "",
            "bytes=",
            "bytes=5-1",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=a-b",
            "bytes=--1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(ignored), None, "{ignored}");
        }
        assert_eq!(content_range(90, 100, 100), "bytes 90-99/100");
        assert_eq!(unsatisfied_range(100), "bytes */100");
    }

    #[test]
    fn content_range_totals() {
        let total = |s: &str| ContentRange::parse(s).and_then(ContentRange::total);
        assert_eq!(total("bytes 0-0/12345"), Some(12345));
        assert_eq!(total("bytes 0-0/*"), None);
        assert_eq!(total("garbage"), None);
    }

    #[test]
    fn content_ranges() {
        let p = ContentRange::parse;
        assert_eq!(
            p("bytes 100-199/200"),
            Some(ContentRange::Bytes {
                first: 100,
                last: 199,
                total: Some(200)
            })
        );
        assert_eq!(
            p(" bytes 0-0/1 "),
            Some(ContentRange::Bytes {
                first: 0,
                last: 0,
                total: Some(1)
            })
        );
        // The sender does not know the size.
        assert_eq!(
            p("bytes 5-9/*"),
            Some(ContentRange::Bytes {
                first: 5,
                last: 9,
                total: None
            })
        );
        assert_eq!(
            p("bytes */42"),
            Some(ContentRange::Unsatisfied { total: 42 })
        );
        assert_eq!(p("bytes */42").and_then(ContentRange::total), Some(42));
        // Round trip with what the server sends.
        assert_eq!(
            p(&content_range(90, 100, 100)).and_then(ContentRange::total),
            Some(100)
        );
        assert_eq!(
            p(&unsatisfied_range(100)),
            Some(ContentRange::Unsatisfied { total: 100 })
        );
        let overflow = "bytes 0-18446744073709551616/18446744073709551617";
        for malformed in [
            "",
            "garbage",
            "bytes",
            "bytes 0-9",
            "bytes 0-9/",
            "bytes */*",
            "bytes *",
            "items 0-9/10",
            "bytes=0-9/10",
            "bytes -9/10",
            "bytes 0-/10",
            "bytes +0-9/10",
            "bytes 0-9/+10",
            "bytes a-b/10",
            "bytes 0-9/x",
            "bytes 0-9/10/11",
            "bytes 0-1,3-4/10",
            overflow,
            "bytes 18446744073709551616-18446744073709551617/*",
            // last before first
            "bytes 9-0/10",
            // a total that does not lie past the last byte
            "bytes 0-9/9",
            "bytes 0-9/5",
        ] {
            assert_eq!(p(malformed), None, "{malformed:?}");
        }
    }
}

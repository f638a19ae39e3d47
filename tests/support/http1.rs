//! HTTP/1.1 on a raw socket, without IO: the bytes of a request, and a response read to EOF
//! taken apart. The one parser of raw responses, for the in-process tests (`client`:
//! `raw_request`, `HeldResponse`) and the end-to-end harness (`tests/e2e/daemon.rs` includes
//! this file by path), so it uses nothing but std.

/// A response read off a raw socket. `status` is 0 if there was no status line to read.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response [`parse`] could not read whole: why, and what it could read.
#[derive(Debug)]
pub struct Malformed {
    pub why: &'static str,
    pub partial: RawResponse,
}

/// `METHOD target HTTP/1.1` exactly as given (no URL normalisation, so `..`, `%2f` and even
/// NUL reach the server), with `Host`, `headers` and `Connection: close`.
pub fn request(method: &str, target: &[u8], host: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(target);
    r.extend_from_slice(format!(" HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n").as_bytes());
    for (name, value) in headers {
        r.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// Where the head of a response ends (the index of its blank line), if it has arrived.
pub fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n")
}

/// A whole response (`head`: to a HEAD request, so no body), chunked bodies decoded.
pub fn parse(raw: &[u8], head: bool) -> Result<RawResponse, Malformed> {
    let Some(split) = head_end(raw) else {
        return Err(Malformed {
            why: "no end of headers",
            partial: RawResponse {
                status: 0,
                headers: Vec::new(),
                body: raw.to_vec(),
            },
        });
    };
    let head_text = String::from_utf8_lossy(raw.get(..split).unwrap_or_default()).into_owned();
    let mut lines = head_text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = raw.get(split + 4..).unwrap_or_default();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let (body, complete) = if head {
        (Vec::new(), true)
    } else if chunked {
        dechunk(rest)
    } else {
        (rest.to_vec(), true)
    };
    let response = RawResponse {
        status: status.unwrap_or(0),
        headers,
        body,
    };
    let why = match (status, complete) {
        (None, _) => "bad status line",
        (_, false) => "bad chunked body",
        _ => return Ok(response),
    };
    Err(Malformed {
        why,
        partial: response,
    })
}

/// [`parse`], keeping what could be read of a malformed or cut-off response.
pub fn parse_lenient(raw: &[u8], head: bool) -> RawResponse {
    parse(raw, head).unwrap_or_else(|m| m.partial)
}

/// A chunked body's data, and whether it ended properly (with its last, empty chunk); a body
/// cut off or garbled keeps what came before.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default());
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        rest = rest.get(eol + 2..).unwrap_or_default();
        if size == 0 {
            return (out, true);
        }
        let data = rest.get(..size).unwrap_or(rest);
        out.extend_from_slice(data);
        match rest.get(size + 2..) {
            Some(next) => rest = next,
            None => break,
        }
    }
    (out, false)
}

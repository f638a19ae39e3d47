//! The Prometheus text exposition format (version 0.0.4), for `GET /metrics` on the admin
//! listener. Pure: the admin handler gathers a snapshot of counters and gauges into
//! [`Family`]s; this renders them.
//!
//! Written here rather than with a metrics crate: every value already lives in the cache's and
//! the upstreams' own counters and is read once per scrape, so a registry of long-lived
//! metric objects would only duplicate them. The format is a few lines of text.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (restarts aside); names end in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One metric: its name, help text, type and samples (one per label set).
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str) -> Family {
        debug_assert!(name.ends_with("_total"), "{name}: counters end in _total");
        Family::new(name, help, Kind::Counter)
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Family {
        Family::new(name, help, Kind::Gauge)
    }

    fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// A sample without labels.
    pub fn value(mut self, v: impl Into<f64>) -> Family {
        self.samples.push((Vec::new(), v.into()));
        self
    }

    /// A sample with labels (names are ours; values may be anything and are escaped).
    pub fn sample(&mut self, labels: Vec<(&'static str, String)>, v: impl Into<f64>) {
        self.samples.push((labels, v.into()));
    }
}

/// The exposition's `Content-Type`.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the families in order. A family without samples is left out: Prometheus would
/// show it as present with no series, which says nothing.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, v) in &f.samples {
            out.push_str(f.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (name, value)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{name}=\"{}\"", escape_label(value));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(*v));
        }
    }
    out
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Help text escapes `\` and newlines.
fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

/// Whole numbers without a fraction (byte counts up to 2^53 are exact in an f64); the
/// format's spellings for the special values.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_samples() {
        let mut up = Family::counter("cistern_upstream_requests_total", "Requests sent.");
        up.sample(vec![("upstream", "mirror".into())], 3u32);
        up.sample(vec![("upstream", "origin".into())], 0u32);
        let text = render(&[
            Family::gauge("cistern_cache_blob_bytes", "Bytes of cached blobs.").value(1536u32),
            up,
            Family::gauge(
                "cistern_cache_max_size_bytes",
                "Not configured, so no sample.",
            ),
        ]);
        assert_eq!(
            text,
            "# HELP cistern_cache_blob_bytes Bytes of cached blobs.\n\
             # TYPE cistern_cache_blob_bytes gauge\n\
             cistern_cache_blob_bytes 1536\n\
             # HELP cistern_upstream_requests_total Requests sent.\n\
             # TYPE cistern_upstream_requests_total counter\n\
             cistern_upstream_requests_total{upstream=\"mirror\"} 3\n\
             cistern_upstream_requests_total{upstream=\"origin\"} 0\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut f = Family::gauge("x", "a \\ b\nc");
        f.sample(
            vec![("a", "q\"uo\\te\nd".into()), ("b", "plain".into())],
            1u8,
        );
        assert_eq!(
            render(&[f]),
            "# HELP x a \\\\ b\\nc\n# TYPE x gauge\nx{a=\"q\\\"uo\\\\te\\nd\",b=\"plain\"} 1\n"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(1.5e20), "150000000000000000000");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(-3.0), "-3");
    }
}

//! Property tests for every parser that the network or a file feeds: whatever the input, each
//! returns a value or an error and never panics; where a parser has an inverse, the two agree.
//!
//! CI runs each property for proptest's default number of cases (256). For a longer soak:
//! `PROPTEST_CASES=100000 cargo test --release --test properties` (see `scripts/soak`).

use cistern::admin::Op;
use cistern::api::headers::{
    ContentRange, RangeRequest, merged_accept, parse_range, retry_after_secs,
};
use cistern::api::registry::{canonical_registry, target, upstream_name};
use cistern::api::route::{parse_query, route};
use cistern::layout::{self, ImageRef};
use cistern::oci::name::check_registry;
use cistern::oci::{Digest, Reference, RepoName, Tag, references};
use cistern::policy::access::Pattern;
use cistern::policy::pins::Pin;
use cistern::server::access::Htpasswd;
use cistern::upstream::auth::challenge::parse_challenge;
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

/// Strings that look like what a client or upstream might send: mostly printable ASCII with
/// the characters the grammars care about, and some arbitrary Unicode.
fn wire_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9/:._@*?%=,;\" -]{0,80}",
        ".{0,40}",
        "(/v2/)?([a-z0-9._-]{1,12}/){0,6}(manifests|blobs|tags)/[a-zA-Z0-9:._-]{0,70}",
    ]
}

/// A repository name from the OCI grammar.
fn repo_name() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}([._-][a-z0-9]{1,6})?(/[a-z0-9]{1,8}([._-][a-z0-9]{1,6})?){0,4}"
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::POST),
    ]
}

proptest! {
    #[test]
    fn routes_and_queries_never_panic(m in method(), path in wire_text(), query in proptest::option::of(wire_text())) {
        let _ = route(&m, &path);
        let _ = parse_query(query.as_deref());
        let _ = Op::from_http(&m, &path, query.as_deref());
    }

    #[test]
    fn valid_names_parse_and_print_back(name in repo_name()) {
        let parsed = RepoName::parse(&name);
        if name.len() <= 255 {
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.as_str(), name.as_str());
            // Routes find the name again, from the path's end.
            let path = format!("/v2/{name}/manifests/latest");
            prop_assert!(route(&Method::GET, &path).is_ok());
            // Docker Hub's library/ prefix never panics, whatever the length.
            let _ = upstream_name("docker.io", &parsed);
        }
    }

    #[test]
    fn names_tags_references_and_digests_never_panic(s in wire_text()) {
        let _ = RepoName::parse(&s);
        let _ = Tag::parse(&s);
        let _ = Reference::parse(&s);
        let _ = Digest::parse(&s);
        let _ = check_registry(&s);
        let _ = canonical_registry(&s);
        if let Ok(name) = RepoName::parse(&s) {
            let t = target(Some(&s), &name, |r| r == "docker.io", true);
            let _ = upstream_name(t.registry.as_deref().unwrap_or("docker.io"), &t.name);
            let _ = target(None, &name, |r| r == "docker.io", false);
        }
    }

    #[test]
    fn digests_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let d = Digest::of(&bytes);
        prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }

    /// A range resolved against any size is either unsatisfiable or a non-empty span inside
    /// the body: a response never claims bytes the blob does not have.
    #[test]
    fn ranges_resolve_inside_the_body(s in "(bytes=)?[0-9 ,-]{0,30}|.{0,20}", size in any::<u64>()) {
        if let Some(r) = parse_range(&s) {
            match r.resolve(size) {
                RangeRequest::Partial { start, end } => {
                    prop_assert!(start < end && end <= size, "{s} on {size}: {start}..{end}");
                }
                RangeRequest::Unsatisfiable | RangeRequest::Full => {}
            }
        }
        let _ = retry_after_secs(&s);
    }

    #[test]
    fn content_ranges_are_consistent(s in "(bytes )?([0-9]{0,21}-[0-9]{0,21}|\\*)/([0-9]{0,21}|\\*)|.{0,20}") {
        if let Some(ContentRange::Bytes { first, last, total }) = ContentRange::parse(&s) {
            prop_assert!(first <= last, "{s}: {first} > {last}");
            if let Some(total) = total {
                prop_assert!(last < total, "{s}: last {last} not below total {total}");
            }
        }
    }

    #[test]
    fn accept_headers_never_panic(values in proptest::collection::vec(wire_text(), 0..6)) {
        let mut headers = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(http::header::ACCEPT, v);
            }
        }
        // Every merged entry comes from what was sent: nothing grows from nothing.
        let sent: usize = values.iter().map(|v| v.split(',').count()).sum();
        prop_assert!(merged_accept(&headers).len() <= sent);
    }

    #[test]
    fn challenges_never_panic(s in "(Bearer|Basic|bearer)? ?([a-z]{1,8}=\"?[a-zA-Z0-9:/._ ,\\\\éü€-]{0,30}\"?,?){0,5}|.{0,60}") {
        let _ = parse_challenge(&s);
    }

    #[test]
    fn manifests_of_any_shape_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), json in json_like()) {
        let _ = references::parse(&bytes);
        let _ = references::parse(json.as_bytes());
        let _ = layout::model::contents(&bytes);
        let _ = layout::model::contents(json.as_bytes());
    }

    #[test]
    fn patterns_and_files_never_panic(s in wire_text()) {
        if let Ok(pin) = Pin::parse(&s) {
            // A pin prints back to a pattern that parses to the same pin.
            prop_assert_eq!(Pin::parse(&pin.to_string()).unwrap(), pin);
        }
        let _ = Pattern::parse(&s);
        let _ = Htpasswd::parse(&s);
        let _ = Htpasswd::parse(&format!("{s}\n{s}:{s}"));
    }

    #[test]
    fn image_references_and_lists_never_panic_and_print_back(s in wire_text()) {
        if let Ok(image) = ImageRef::parse(&s, "docker.io") {
            // What `index.json` records as the full name names the same image again.
            prop_assert_eq!(ImageRef::parse(&image.to_string(), "ghcr.io").unwrap(), image);
        }
        let _ = layout::parse_list(&s);
        let _ = layout::parse_list(&format!("{s}\n# {s}\n{s} # x"));
    }

    #[test]
    fn layout_indexes_and_imported_names_never_panic_and_round_trip(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        json in json_like(),
        s in wire_text(),
        prefix in proptest::option::of(wire_text()),
    ) {
        let _ = layout::model::parse_index(&bytes);
        let _ = layout::model::parse_index(json.as_bytes());
        let top = layout::model::Needed {
            digest: Digest::of(s.as_bytes()),
            size: None,
            media_type: None,
        };
        for key in [layout::model::REF_NAME, layout::model::FULL_NAME] {
            let entry = layout::model::LayoutEntry {
                top: top.clone(),
                annotations: [(key.to_string(), s.clone())].into(),
            };
            let _ = layout::model::imported_name(&entry, "registry.test", prefix.as_deref());
        }
        if let Ok(image) = ImageRef::parse(&s, "docker.io") {
            // What export writes in index.json, import reads back as the same image.
            let entry = layout::model::Entry {
                image: image.clone(),
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                digest: image.digest.clone().unwrap_or_else(|| Digest::of(b"top")),
                size: 1,
            };
            let parsed = layout::model::parse_index(&layout::model::index_json(&[entry])).unwrap();
            let back = layout::model::imported_name(&parsed[0], "elsewhere.test", prefix.as_deref());
            prop_assert_eq!(back.unwrap(), Some(image));
        }
    }

    #[test]
    fn configs_never_panic(s in config_like()) {
        if let Ok(config) = cistern::Config::from_toml(&s) {
            let _ = config.summary().to_string();
            let _ = config.referenced_files();
        }
    }
}

/// JSON documents with the keys manifests use, and values of the wrong types.
fn json_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("schemaVersion"),
        Just("mediaType"),
        Just("config"),
        Just("layers"),
        Just("manifests"),
        Just("digest"),
        Just("subject"),
        Just("fsLayers"),
        Just("blobSum"),
        Just("size"),
    ];
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("\"sha256:abc\"".to_string()),
        Just(format!("\"{}\"", Digest::of(b"x"))),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((key.clone(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// TOML with the config's tables and keys, and values of any type.
fn config_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("[upstream]".to_string()),
        Just("[cache]".to_string()),
        Just("[access]".to_string()),
        Just("[upstreams.a]".to_string()),
        Just("[[routes]]".to_string()),
        Just("[tls]".to_string()),
        Just("[admin]".to_string()),
        (
            prop_oneof![
                Just("url"),
                Just("registry"),
                Just("upstreams"),
                Just("default"),
                Just("tag_ttl"),
                Just("max_size"),
                Just("pins"),
                Just("anonymous"),
                Just("listen"),
                Just("username"),
                Just("password"),
                Just("high_watermark"),
                Just("low_watermark"),
                Just("tags_from"),
            ],
            prop_oneof![
                Just("\"http://127.0.0.1:1\"".to_string()),
                Just("\"docker.io\"".to_string()),
                Just("[\"a\"]".to_string()),
                Just("[\"docker.io/*\", \"\"]".to_string()),
                Just("true".to_string()),
                Just("\"5m\"".to_string()),
                Just("\"1GiB\"".to_string()),
                Just("0.5".to_string()),
                Just("-1".to_string()),
                Just("\"\"".to_string()),
                "\"[ -~]{0,12}\"",
            ],
        )
            .prop_map(|(k, v)| format!("{k} = {v}")),
    ];
    proptest::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

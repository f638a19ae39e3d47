//! `cistern export`: images pulled through a cistern, written from its stopped cache as an OCI
//! image layout (directory and tar), checked file by file; and what it does when the cache
//! lacks something or holds a damaged blob.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use bytes::Bytes;
use http::StatusCode;
use support::*;

/// What the fake registry holds and the test pulled.
struct Pulled {
    data: DataDir,
    /// `127.0.0.1:<port>`: the registry's name in cistern's routes and tag records.
    registry: String,
    index: Bytes,
    single: Bytes,
    /// Every blob of both images.
    blobs: Vec<Bytes>,
}

/// `library/app:1.0`, an OCI index of two image manifests (sharing a layer), and
/// `library/tool` (one image manifest, by digest), pulled through a cistern which is then
/// stopped.
async fn pull_two_images() -> Pulled {
    let config_a = Bytes::from_static(br#"{"architecture":"amd64"}"#);
    let config_b = Bytes::from_static(br#"{"architecture":"arm64"}"#);
    let config_c = Bytes::from_static(br#"{"tool":true}"#);
    let shared = blob_bytes(300 * KIB, 1);
    let only_a = blob_bytes(700 * KIB, 2);
    let only_b = blob_bytes(1000, 3);
    let tool_layer = blob_bytes(50 * KIB, 4);
    let a = oci_image_manifest(&config_a, &[&shared, &only_a]);
    let b = oci_image_manifest(&config_b, &[&shared, &only_b]);
    let index = oci_index(&[&a, &b]);
    let single = oci_image_manifest(&config_c, &[&tool_layer]);
    let blobs = vec![
        config_a, config_b, config_c, shared, only_a, only_b, tool_layer,
    ];
    let mut builder = FakeRegistry::builder()
        .manifest("library/app", None, OCI_MANIFEST, a.clone())
        .manifest("library/app", None, OCI_MANIFEST, b.clone())
        .manifest("library/app", Some("1.0"), OCI_INDEX, index.clone())
        .manifest("library/tool", None, OCI_MANIFEST, single.clone());
    for blob in &blobs {
        builder = builder
            .blob("library/app", blob.clone())
            .blob("library/tool", blob.clone());
    }
    let registry = builder.start().await;
    let cistern = TestCistern::start(&registry).await;
    let c = cistern.client();
    for (repo, reference) in [
        ("library/app", "1.0".to_string()),
        ("library/app", sha256_digest(&a)),
        ("library/app", sha256_digest(&b)),
        ("library/tool", sha256_digest(&single)),
    ] {
        let m = c.get_manifest(repo, &reference).await;
        assert_eq!(m.status, StatusCode::OK, "{repo}:{reference}");
    }
    for blob in &blobs {
        cistern
            .get_blob_committed("library/app", &sha256_digest(blob))
            .await;
    }
    let data = cistern.shutdown().await;
    Pulled {
        data,
        registry: registry.addr().to_string(),
        index,
        single,
        blobs,
    }
}

fn export(data: &DataDir, out: &Path, refs: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cistern"))
        .arg("export")
        .arg("--data-dir")
        .arg(data.path())
        .arg("-o")
        .arg(out)
        .args(refs)
        .stdin(Stdio::null())
        .output()
        .expect("run cistern export")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The layout's files, by path relative to its root.
type Files = BTreeMap<String, Vec<u8>>;

fn dir_files(root: &Path) -> Files {
    let mut out = Files::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn tar_files(tar: &Path) -> Files {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    let mut out = Files::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        assert!(out.insert(path.clone(), bytes).is_none(), "{path} twice");
    }
    out
}

/// Checks a layout: `oci-layout`, every blob named by its sha256, exactly the expected blobs,
/// and `index.json` naming `tops` (digest, media type, size, ref name, full name), in order.
fn check_layout(files: &Files, expected: &[&[u8]], tops: &[(&Bytes, &str, &str, &str)]) {
    assert_eq!(
        files.get("oci-layout").map(Vec::as_slice),
        Some(&br#"{"imageLayoutVersion":"1.0.0"}"#[..])
    );
    let mut names = BTreeSet::new();
    for (path, bytes) in files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            assert_eq!(sha256_digest(bytes), format!("sha256:{hex}"), "{path}");
            names.insert(format!("sha256:{hex}"));
        } else {
            assert!(path == "oci-layout" || path == "index.json", "stray {path}");
        }
    }
    let want: BTreeSet<String> = expected.iter().map(|b| sha256_digest(b)).collect();
    assert_eq!(names, want, "the blobs of the layout");
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), tops.len(), "{index}");
    for (m, (bytes, media_type, ref_name, full)) in manifests.iter().zip(tops) {
        assert_eq!(m["digest"], sha256_digest(bytes));
        assert_eq!(m["size"], bytes.len());
        assert_eq!(m["mediaType"], *media_type);
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            *ref_name
        );
        assert_eq!(m["annotations"]["io.containerd.image.name"], *full);
    }
}

/// Nothing named `out` or `out.tmp-*` beside it.
#[track_caller]
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let leftovers: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[tokio::test]
async fn export_writes_a_layout_as_a_directory_and_as_a_tar() {
    let p = pull_two_images().await;
    let app = format!("{}/library/app:1.0", p.registry);
    let tool = format!("{}/library/tool@{}", p.registry, sha256_digest(&p.single));
    let out_dir = tempfile::tempdir().unwrap();
    let (dir, tar) = (
        out_dir.path().join("layout"),
        out_dir.path().join("images.tar"),
    );

    // The index and its manifests, and every blob of both images: once each, though a layer
    // is shared and an image is named twice.
    let manifests: Vec<Bytes> = {
        let index: serde_json::Value = serde_json::from_slice(&p.index).unwrap();
        let children = index["manifests"].as_array().unwrap();
        children
            .iter()
            .map(|c| {
                let d = c["digest"].as_str().unwrap();
                let stored = std::fs::read(p.data.manifest_path(d)).unwrap();
                let nl = stored.iter().position(|&b| b == b'\n').unwrap();
                Bytes::copy_from_slice(&stored[nl + 1..])
            })
            .collect()
    };
    let mut expected: Vec<&[u8]> = vec![&p.index, &p.single];
    expected.extend(manifests.iter().map(|m| &m[..]));
    expected.extend(p.blobs.iter().map(|b| &b[..]));
    let tops = [
        (&p.index, OCI_INDEX, "1.0", app.as_str()),
        (&p.single, OCI_MANIFEST, tool.as_str(), tool.as_str()),
    ];

    for out in [&dir, &tar] {
        let run = export(&p.data, out, &[app.clone(), tool.clone(), app.clone()]);
        assert!(run.status.success(), "{}", text(&run));
        assert!(
            text(&run).contains("2 images, 4 manifests and 7 blobs"),
            "{}",
            text(&run)
        );
        let files = if out == &tar {
            tar_files(out)
        } else {
            dir_files(out)
        };
        check_layout(&files, &expected, &tops);
        // Nothing but OUT itself beside it.
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        let beside: Vec<String> = std::fs::read_dir(out_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&name) && *n != name)
            .collect();
        assert!(beside.is_empty(), "{beside:?}");
    }
    // The directory and the tar hold the same files.
    assert_eq!(dir_files(&dir), tar_files(&tar));

    // An existing output is not overwritten.
    let again = export(&p.data, &dir, std::slice::from_ref(&app));
    assert!(!again.status.success());
    assert!(text(&again).contains("exists"), "{}", text(&again));

    // `-f LIST` names the images one a line, with comments.
    let list = out_dir.path().join("images.txt");
    std::fs::write(&list, format!("# site A\n{app}  # the app\n\n")).unwrap();
    let from_list = out_dir.path().join("from-list");
    let run = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .arg("export")
        .arg("--data-dir")
        .arg(p.data.path())
        .arg("-o")
        .arg(&from_list)
        .arg("-f")
        .arg(&list)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from_list.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], sha256_digest(&p.index));
}

#[tokio::test]
async fn missing_or_damaged_content_fails_naming_it_and_writes_nothing() {
    let p = pull_two_images().await;
    let app = format!("{}/library/app:1.0", p.registry);
    let out_dir = tempfile::tempdir().unwrap();

    // A tag the cache never saw.
    let unknown = format!("{}/library/app:2.0", p.registry);
    let out = out_dir.path().join("unknown");
    let run = export(&p.data, &out, std::slice::from_ref(&unknown));
    assert!(!run.status.success());
    assert!(text(&run).contains(&unknown), "{}", text(&run));
    assert_no_output(&out);

    // A blob damaged on disk since it was cached (same length, other bytes): found while
    // copying, named, and the partial output removed, as a directory and as a tar.
    let damaged = &p.blobs[4];
    let path = p.data.blob_path(&sha256_digest(damaged));
    let mut bytes = damaged.to_vec();
    bytes[1000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    for name in ["damaged", "damaged.tar"] {
        let out = out_dir.path().join(name);
        let run = export(&p.data, &out, std::slice::from_ref(&app));
        assert!(!run.status.success(), "{name}");
        let said = text(&run);
        assert!(
            said.contains(&sha256_digest(damaged)) && said.contains("damaged"),
            "{said}"
        );
        assert_no_output(&out);
    }

    // A blob missing from the cache: named with its image before anything is written.
    std::fs::remove_file(&path).unwrap();
    for name in ["missing", "missing.tar"] {
        let out = out_dir.path().join(name);
        let run = export(&p.data, &out, std::slice::from_ref(&app));
        assert!(!run.status.success(), "{name}");
        let said = text(&run);
        assert!(
            said.contains(&app) && said.contains(&sha256_digest(damaged)),
            "{said}"
        );
        assert_no_output(&out);
    }

    // A missing child manifest of the index, likewise (the blob back in place).
    std::fs::write(&path, damaged).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&p.index).unwrap();
    let child = index["manifests"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(p.data.manifest_path(&child)).unwrap();
    let out = out_dir.path().join("no-child");
    let run = export(&p.data, &out, std::slice::from_ref(&app));
    assert!(!run.status.success());
    assert!(text(&run).contains(&child), "{}", text(&run));
    assert_no_output(&out);
}

#[tokio::test]
async fn a_cache_a_server_is_using_is_refused() {
    let registry = FakeRegistry::builder().start().await;
    let cistern = TestCistern::start(&registry).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("layout");
    let run = export(
        cistern.data(),
        &dest,
        &["docker.io/library/app:1".to_string()],
    );
    assert!(!run.status.success());
    assert!(text(&run).contains("in use"), "{}", text(&run));
    assert_no_output(&dest);
    cistern.shutdown().await;
}

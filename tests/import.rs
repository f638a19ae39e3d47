//! `cistern import`: layouts written by `cistern export` (directory and tar) and by hand (tags
//! only, Docker media types) read into a fresh, stopped cache, then served by an offline
//! cistern with no reachable upstream, by tag and by digest; and every way a layout can be
//! incomplete or hostile refused, naming what is wrong, with no tag recorded.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bytes::Bytes;
use http::StatusCode;
use support::*;

/// What the fake registry held, exported from a cistern that pulled it.
struct Exported {
    /// `127.0.0.1:<port>`: the registry in the exported names (the registry itself is gone).
    registry: String,
    index: Bytes,
    children: Vec<Bytes>,
    single: Bytes,
    blobs: Vec<Bytes>,
    dir: tempfile::TempDir,
}

impl Exported {
    fn layout(&self) -> PathBuf {
        self.dir.path().join("layout")
    }

    fn tar(&self) -> PathBuf {
        self.dir.path().join("layout.tar")
    }
}

/// `library/app:1.0` (an OCI index of two image manifests sharing a layer) and `library/tool`
/// (one image manifest, by digest), pulled through a cistern, exported as a directory and as
/// a tar; the cistern and the registry are gone afterwards.
async fn export_two_images() -> Exported {
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
    let name = registry.addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let app = format!("{name}/library/app:1.0");
    let tool = format!("{name}/library/tool@{}", sha256_digest(&single));
    for out in ["layout", "layout.tar"] {
        let run = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .arg("export")
            .arg("--data-dir")
            .arg(data.path())
            .arg("-o")
            .arg(dir.path().join(out))
            .args([&app, &tool])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", text(&run));
    }
    Exported {
        registry: name,
        index,
        children: vec![a, b],
        single,
        blobs,
        dir,
    }
}

fn import(data: &DataDir, input: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cistern"))
        .arg("import")
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .arg(input)
        .stdin(Stdio::null())
        .output()
        .expect("run cistern import")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An import that must fail saying each of `says`, leaving no tag, link or manifest in the
/// cache and nothing in its `tmp/`.
#[track_caller]
fn assert_refused(data: &DataDir, input: &Path, args: &[&str], says: &[&str]) {
    let run = import(data, input, args);
    let said = text(&run);
    assert!(!run.status.success(), "imported: {said}");
    for s in says {
        assert!(said.contains(s), "{s:?} not in: {said}");
    }
    for sub in ["tags", "links", "manifests", "tmp"] {
        assert_eq!(data.files(sub), Vec::<PathBuf>::new(), "{sub}: {said}");
    }
}

/// A cistern over `data` with `offline = true`, its one route for `registry`, whose upstream
/// is a closed port.
async fn offline(data: DataDir, registry: &str) -> TestCistern {
    TestCistern::builder()
        .upstream_url(format!("http://{registry}"))
        .data(data)
        .config(|c| c.offline = true)
        .start()
        .await
}

#[tokio::test]
async fn an_exported_layout_imported_into_a_fresh_cache_is_served_offline() {
    let e = export_two_images().await;
    for input in [e.tar(), e.layout()] {
        let data = DataDir::new();
        let run = import(&data, &input, &[]);
        let said = text(&run);
        assert!(run.status.success(), "{said}");
        assert!(
            said.contains("2 images (1 tags); 4 manifests and 7 blobs"),
            "{said}"
        );
        // Again: everything is there already, nothing is copied, the answer is the same.
        let again = import(&data, &input, &[]);
        let said = text(&again);
        assert!(again.status.success(), "{said}");
        assert!(
            said.contains("0 manifests and 0 blobs (0 B) imported, 4 manifests and 7 blobs"),
            "{said}"
        );
        assert_eq!(data.tmp_files(), Vec::<PathBuf>::new());

        let cistern = offline(data, &e.registry).await;
        let c = cistern.client();
        let by_tag = c.get_manifest("library/app", "1.0").await;
        assert_eq!(by_tag.status, StatusCode::OK, "{}", by_tag.body_text());
        assert_same_bytes(by_tag.bytes(), &e.index, "the index by tag");
        assert_eq!(
            by_tag.header("docker-content-digest"),
            Some(sha256_digest(&e.index).as_str())
        );
        assert_eq!(by_tag.header("content-type"), Some(OCI_INDEX));
        for child in &e.children {
            let m = c.get_manifest("library/app", &sha256_digest(child)).await;
            assert_eq!(m.status, StatusCode::OK);
            assert_same_bytes(m.bytes(), child, "a child by digest");
        }
        let tool = c
            .get_manifest("library/tool", &sha256_digest(&e.single))
            .await;
        assert_eq!(tool.status, StatusCode::OK);
        assert_same_bytes(tool.bytes(), &e.single, "the tool by digest");
        for blob in &e.blobs {
            let got = c
                .get_blob("library/app", &sha256_digest(blob))
                .await
                .unwrap();
            assert_same_bytes(&got, blob, "a blob");
        }
        // The image named by digest only is linked to its repository.
        assert_eq!(cistern.data().files("links").len(), 1);
        c.assert_manifest_unknown("library/app", "2.0").await;
        cistern.shutdown().await;
    }
}

/// The path of blob `content` in a layout directory.
fn layout_blob(layout: &Path, content: &[u8]) -> PathBuf {
    let digest = sha256_digest(content);
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

#[tokio::test]
async fn corrupt_or_missing_content_is_refused_naming_its_digest() {
    let e = export_two_images().await;
    let layout = e.layout();
    let app = format!("{}/library/app:1.0", e.registry);

    // One flipped byte in a layer of the index's second image.
    let layer = &e.blobs[5];
    let path = layout_blob(&layout, layer);
    let mut bytes = layer.to_vec();
    bytes[500] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let data = DataDir::new();
    assert_refused(
        &data,
        &layout,
        &[],
        &[&sha256_digest(layer), "corrupt", &app],
    );

    // The blob cut short.
    std::fs::write(&path, &layer[..400]).unwrap();
    assert_refused(&data, &layout, &[], &[&sha256_digest(layer), "400"]);

    // Missing.
    std::fs::remove_file(&path).unwrap();
    assert_refused(&data, &layout, &[], &[&sha256_digest(layer), "missing"]);
    std::fs::write(&path, layer).unwrap();

    // A child manifest missing.
    let child = layout_blob(&layout, &e.children[1]);
    std::fs::remove_file(&child).unwrap();
    assert_refused(
        &data,
        &layout,
        &[],
        &[&sha256_digest(&e.children[1]), "missing"],
    );
    std::fs::write(&child, &e.children[1]).unwrap();

    // Whole again, it imports.
    let run = import(&data, &layout, &[]);
    assert!(run.status.success(), "{}", text(&run));

    // A cache a server is using is refused.
    let cistern = offline(DataDir::new(), &e.registry).await;
    let run = import(cistern.data(), &layout, &[]);
    assert!(!run.status.success());
    assert!(text(&run).contains("in use"), "{}", text(&run));
    cistern.shutdown().await;
}

#[tokio::test]
async fn truncated_or_hostile_tars_are_refused() {
    let e = export_two_images().await;
    let whole = std::fs::read(e.tar()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new();

    // Cut in the middle of a blob, and cut after the last entry (no end-of-archive marker).
    for (name, len) in [
        ("half.tar", whole.len() / 2),
        ("cut.tar", whole.len() - 1024),
    ] {
        let tar = dir.path().join(name);
        std::fs::write(&tar, &whole[..len]).unwrap();
        assert_refused(&data, &tar, &[], &["truncated"]);
    }
    assert_eq!(data.blob_files(), Vec::<PathBuf>::new());

    // A path climbing out of the layout, and a symbolic link.
    let traversal = dir.path().join("traversal.tar");
    let mut header = tar::Header::new_gnu();
    let name = b"../../escaped";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(3);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"bad"[..]).unwrap();
    std::fs::write(&traversal, builder.into_inner().unwrap()).unwrap();
    assert_refused(
        &data,
        &traversal,
        &[],
        &["../../escaped", "outside the layout"],
    );
    assert!(!dir.path().join("escaped").exists());

    let link = dir.path().join("link.tar");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(&mut header, "index.json", "/etc/passwd")
        .unwrap();
    std::fs::write(&link, builder.into_inner().unwrap()).unwrap();
    assert_refused(&data, &link, &[], &["index.json", "Symlink"]);

    // Links outside the layout's own files are never read: `docker save` adds its legacy
    // `<id>/layer.tar` as links into `blobs/`. The layout beside them imports.
    let saved = dir.path().join("saved.tar");
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", e.layout()).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    let hex = sha256_digest(&e.blobs[6]);
    let target = format!("../blobs/sha256/{}", hex.strip_prefix("sha256:").unwrap());
    builder
        .append_link(&mut header, "0123abcd/layer.tar", &target)
        .unwrap();
    std::fs::write(&saved, builder.into_inner().unwrap()).unwrap();
    let run = import(&data, &saved, &[]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("2 images (1 tags)"), "{}", text(&run));
}

/// A layout as `skopeo copy … oci:DIR:1.0` writes it: the image named by its tag alone, here
/// with Docker media types.
fn tag_only_layout(dir: &Path) -> (Bytes, Vec<Bytes>) {
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let layer = blob_bytes(20 * KIB, 9);
    let descriptor = |media_type: &str, data: &[u8]| serde_json::json!({"mediaType": media_type, "digest": sha256_digest(data), "size": data.len()});
    let manifest = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": descriptor("application/vnd.docker.container.image.v1+json", &config),
            "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer)],
        })
        .to_string(),
    );
    let mut top = descriptor(DOCKER_MANIFEST, &manifest);
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "1.0"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    let blobs = vec![config, layer];
    for content in blobs.iter().chain([&manifest]) {
        std::fs::write(layout_blob(dir, content), content).unwrap();
    }
    (manifest, blobs)
}

#[tokio::test]
async fn a_layout_named_by_tags_alone_is_placed_by_registry_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let (manifest, blobs) = tag_only_layout(&layout);
    let data = DataDir::new();
    // Which repository is `1.0` in? Refused until the import says.
    assert_refused(&data, &layout, &[], &["--prefix", "1.0"]);
    assert_eq!(data.blob_files(), Vec::<PathBuf>::new());

    let registry = "127.0.0.1:9";
    let run = import(
        &data,
        &layout,
        &["--registry", registry, "--prefix", "team/app"],
    );
    assert!(run.status.success(), "{}", text(&run));
    let cistern = offline(data, registry).await;
    let c = cistern.client();
    let m = c.get_manifest("team/app", "1.0").await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.body_text());
    assert_same_bytes(m.bytes(), &manifest, "the manifest by tag");
    assert_eq!(m.header("content-type"), Some(DOCKER_MANIFEST));
    for blob in &blobs {
        let got = c.get_blob("team/app", &sha256_digest(blob)).await.unwrap();
        assert_same_bytes(&got, blob, "a blob");
    }
    cistern.shutdown().await;
}

//! End-to-end: images pulled by skopeo through a real cistern from a real registry (Debian's
//! `docker-registry`), exported from the stopped cache with `cistern export`, and read back by
//! skopeo from the layout directory (`oci:`) and from a tar of it (`oci-archive:`): the top
//! manifest, every child manifest and every blob arrive with the digests the registry has.
//! OCI manifests and indexes, and Docker v2s2 manifests and manifest lists (which skopeo 1.9
//! finds only in a layout of one image: it looks names up among OCI media types only).
//!
//! Running, skipping and `CISTERN_REQUIRE_E2E` / `CISTERN_E2E_KEEP` as in
//! `tests/e2e_real_clients.rs` (skopeo and docker-registry needed; no root).

#[allow(dead_code)] // the harness serves several test crates; this one uses part of it
mod e2e;

use std::path::Path;
use std::process::{Command, Output};

use e2e::cistern::Cistern;
use e2e::fixtures::{self, Seeded};
use e2e::image::sha256_digest;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What `skopeo copy --all … dir:DIR` wrote must be `seeded`, byte for byte.
fn check_dir(dir: &Path, seeded: &Seeded, what: &str) {
    let manifest = std::fs::read(dir.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{what}: no manifest.json: {e}"));
    assert_eq!(
        sha256_digest(&manifest),
        seeded.digest,
        "{what}: top manifest"
    );
    assert!(manifest == seeded.manifest, "{what}: manifest bytes differ");
    for (arch, child) in &seeded.children {
        let hex = child.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(dir.join(format!("{hex}.manifest.json")))
            .unwrap_or_else(|e| panic!("{what}: {arch} child {child} not copied: {e}"));
        assert_eq!(&sha256_digest(&bytes), child, "{what}: {arch} child");
    }
    for blob in &seeded.blobs {
        let hex = blob.strip_prefix("sha256:").unwrap();
        if let Err(e) = fixtures::check_blob_file(&dir.join(hex), blob) {
            panic!("{what}: blob {blob} not copied whole: {e}");
        }
    }
}

#[test]
fn skopeo_reads_what_cistern_exports() {
    let Some(work) = e2e::begin(
        "skopeo_reads_what_cistern_exports",
        e2e::SKOPEO_TOOLS,
        false,
        "export",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    // OCI manifest and index, Docker v2s2 manifest and manifest list.
    let images = [&fx.app, &fx.multi, &fx.dockerv2, &fx.mlist];

    // Fill the cache by pulling through cistern, then stop it: export reads a stopped cache.
    let mut cistern = Cistern::start(&work.sub("cistern"), registry.addr);
    let ctx = || e2e::logs(&[&registry], Some(&cistern));
    for (n, seeded) in images.iter().enumerate() {
        skopeo.copy_to_dir(
            &seeded.reference(&cistern.host()),
            &work.sub("pulled").join(n.to_string()),
            &ctx,
        );
    }
    let stopped = cistern.daemon.terminate();
    assert!(
        matches!(&stopped, Ok(s) if s.success()),
        "{stopped:?}\n{}",
        cistern.daemon.tail(30)
    );

    // The route serves docker.io, so the images are docker.io/<repo>:<tag>.
    let refs: Vec<String> = images
        .iter()
        .map(|s| format!("docker.io/{}:{}", s.repo, s.tag))
        .collect();
    let out = work.sub("out");
    let export = |dest: &Path, refs: &[String]| {
        let run = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .arg("export")
            .arg("--data-dir")
            .arg(&cistern.data_dir)
            .arg("-o")
            .arg(dest)
            .args(refs)
            .output()
            .unwrap();
        assert!(run.status.success(), "export: {}", text(&run));
    };
    let layout = out.join("layout");
    let archive = out.join("images.tar");
    export(&layout, &refs);
    export(&archive, &refs);

    // Every image shares tag 1.0, so each is named by its full reference. skopeo 1.9 (Debian's)
    // looks names up only among descriptors of OCI media types: the OCI images by name.
    let oci_typed = [(&fx.app, &refs[0]), (&fx.multi, &refs[1])];
    for (n, (seeded, reference)) in oci_typed.into_iter().enumerate() {
        for (transport, path) in [("oci", &layout), ("oci-archive", &archive)] {
            let source = format!("{transport}:{}:{reference}", path.display());
            let dest = work.sub("copied").join(format!("{transport}-{n}"));
            let run = skopeo.try_copy_local_to_dir(&source, &dest);
            assert!(run.status.success(), "skopeo copy {source}: {}", text(&run));
            check_dir(&dest, seeded, &source);
        }
    }
    // The Docker-typed ones keep their own media type in index.json (a descriptor names what
    // the bytes are; rewriting it would change the digest clients verify). skopeo 1.9 reads
    // such an image from a layout that holds only it, named or not by the reader.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    for (m, seeded) in index["manifests"].as_array().unwrap().iter().zip(images) {
        assert_eq!(m["mediaType"], seeded.media_type.as_str(), "{m}");
        assert_eq!(m["digest"], seeded.digest.as_str(), "{m}");
    }
    for (n, (seeded, reference)) in [(&fx.dockerv2, &refs[2]), (&fx.mlist, &refs[3])]
        .into_iter()
        .enumerate()
    {
        let alone = out.join(format!("docker-{n}.tar"));
        export(&alone, std::slice::from_ref(reference));
        let source = format!("oci-archive:{}", alone.display());
        let dest = work.sub("copied").join(format!("docker-{n}"));
        let run = skopeo.try_copy_local_to_dir(&source, &dest);
        assert!(run.status.success(), "skopeo copy {source}: {}", text(&run));
        check_dir(&dest, seeded, &source);
    }

    // One image alone is named by its tag, as `oci:DIR:TAG` expects.
    let single = out.join("app");
    export(&single, std::slice::from_ref(&refs[0]));
    let source = format!("oci:{}:{}", single.display(), fx.app.tag);
    let dest = work.sub("copied").join("by-tag");
    let run = skopeo.try_copy_local_to_dir(&source, &dest);
    assert!(run.status.success(), "skopeo copy {source}: {}", text(&run));
    check_dir(&dest, &fx.app, &source);
}

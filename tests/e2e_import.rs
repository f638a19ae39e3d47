//! End-to-end: OCI image layouts written by skopeo (`skopeo copy docker://… oci:DIR:1.0`, from
//! a real registry, Debian's `docker-registry`) imported with `cistern import` into a fresh
//! cache, which an offline cistern with no reachable upstream then serves to skopeo: the top
//! manifest, every child manifest and every blob arrive with the digests the registry has, by
//! tag and by digest. skopeo names each image by its tag alone, so the import places it with
//! `--registry docker.io --prefix <repository>`.
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
fn an_offline_cistern_serves_what_it_imported_from_skopeo_layouts() {
    let Some(work) = e2e::begin(
        "an_offline_cistern_serves_what_it_imported_from_skopeo_layouts",
        e2e::SKOPEO_TOOLS,
        false,
        "import",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    let rctx = || e2e::logs(&[&registry], None);
    // An OCI image manifest and an OCI index of two platforms, each in a layout of its own,
    // named `1.0` as `oci:DIR:1.0` names it; one layout as a directory, one as a tar of it.
    let images = [&fx.app, &fx.multi];
    let layouts = work.sub("layouts");
    let mut inputs = Vec::new();
    for seeded in images {
        let dir = layouts.join(seeded.repo.replace('/', "-"));
        skopeo.copy_to_layout(
            &seeded.reference(&registry.host()),
            &dir,
            &seeded.tag,
            &rctx,
        );
        inputs.push((seeded, dir));
    }
    let tar = layouts.join("multi.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&tar).unwrap());
    builder.append_dir_all(".", &inputs[1].1).unwrap();
    builder.into_inner().unwrap();
    inputs[1].1 = tar;

    // Import into a fresh cache; the registry is stopped, so nothing can come from it.
    let dir = work.sub("cistern");
    let data_dir = dir.join("cache");
    std::fs::create_dir_all(&data_dir).unwrap();
    drop(registry);
    for (seeded, input) in &inputs {
        let run = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .arg("import")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--registry", "docker.io", "--prefix", &seeded.repo])
            .arg(input)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "import {}: {}",
            input.display(),
            text(&run)
        );
    }

    // Offline, the route's upstream a closed port: everything comes from the imported cache.
    let routes = "offline = true\n\
                  [upstreams.gone]\n\
                  url = \"http://127.0.0.1:9\"\n\
                  [[routes]]\n\
                  registry = \"docker.io\"\n\
                  upstreams = [\"gone\"]\n\
                  default = true\n";
    let cistern = Cistern::start_routes(&dir, routes);
    let ctx = || e2e::logs(&[], Some(&cistern));
    for (n, seeded) in images.iter().enumerate() {
        let by_tag = work.sub("pulled").join(format!("tag-{n}"));
        skopeo.copy_to_dir(&seeded.reference(&cistern.host()), &by_tag, &ctx);
        check_dir(&by_tag, seeded, "by tag");
        let by_digest = work.sub("pulled").join(format!("digest-{n}"));
        let reference = format!("{}/{}@{}", cistern.host(), seeded.repo, seeded.digest);
        skopeo.copy_to_dir(&reference, &by_digest, &ctx);
        check_dir(&by_digest, seeded, "by digest");
    }
}

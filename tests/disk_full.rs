//! A real full disk: the cistern binary runs with its data directory on a small tmpfs, in a
//! private mount namespace (`unshare --mount`, so the mount vanishes with the process and the
//! host never sees it). A blob larger than the free space must still reach its clients whole
//! and verified (pass-through), leave nothing behind, make eviction free room, and be cached
//! by the next pull once there is room.
//!
//! Needs root (to mount) and `unshare` (util-linux). Without them the test prints `SKIPPED`
//! and passes, unless `CISTERN_REQUIRE_E2E=1` (CI), which makes it fail instead.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::data_dir::{blob_path_in, files_in};
use support::process::ChildCistern;
use support::{
    Client, DataDir, FakeRegistry, MIB, assert_same_bytes, blob_bytes, blob_route, sha256_digest,
};

const REPO: &str = "disk/full";
/// The tmpfs: room for the small blob and a little, not for the large one beside it.
const TMPFS_MIB: usize = 24;

/// The cistern binary in its own mount namespace with `data` on a tmpfs.
struct Confined {
    process: ChildCistern,
    /// `data` as the child sees it, through `/proc/<pid>/root`.
    data: PathBuf,
    log: PathBuf,
}

impl Confined {
    async fn start(upstream: &str, root: &Path) -> Confined {
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = root.join("cistern.log");
        let process = ChildCistern::start(upstream, &data, Some(log.clone()), |config| {
            // Ranges of the blob being filled follow the fill (through its pass-through window
            // once the disk is full), as they did before cold_ranges.
            let mut file = std::fs::OpenOptions::new().append(true).open(config).unwrap();
            std::io::Write::write_all(&mut file, b"[cache]\ncold_ranges = \"wait\"\n").unwrap();
            let mut command = Command::new("unshare");
            command
                .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(
                    r#"mount -t tmpfs -o "size=$1" cistern-test "$2" && exec "$3" serve --config "$4""#,
                )
                .arg("sh")
                .arg(format!("{TMPFS_MIB}m"))
                .arg(&data)
                .arg(env!("CARGO_BIN_EXE_cistern"))
                .arg(config);
            command
        })
        .await;
        let seen = PathBuf::from(format!("/proc/{}/root", process.pid())).join(
            data.strip_prefix("/")
                .expect("temporary directories are absolute"),
        );
        Confined {
            process,
            data: seen,
            log,
        }
    }

    fn files(&self, sub: &str) -> Vec<PathBuf> {
        files_in(&self.data, sub)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path_in(&self.data, digest)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Root and `unshare`, or a skip (a failure under `CISTERN_REQUIRE_E2E=1`).
fn can_mount() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(2)?.parse::<u32>().ok()
        })
        == Some(0);
    let unshare = Command::new("unshare")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if root && unshare {
        return true;
    }
    let why = format!("root: {root}, unshare: {unshare}");
    if std::env::var("CISTERN_REQUIRE_E2E").as_deref() == Ok("1") {
        panic!("the disk-full test needs root and unshare ({why}); CISTERN_REQUIRE_E2E=1");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: the disk-full test needs root and unshare ({why})"
    );
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_passes_the_blob_through_then_makes_room() {
    support::init();
    if !can_mount() {
        return;
    }
    let small = blob_bytes(8 * MIB, 7);
    let large = blob_bytes(20 * MIB, 8);
    let (small_digest, large_digest) = (sha256_digest(&small), sha256_digest(&large));
    let upstream = FakeRegistry::builder()
        .blob(REPO, small.clone())
        .blob(REPO, large.clone())
        .start()
        .await;
    let dir = DataDir::new();
    let cistern = Confined::start(&upstream.url(), dir.root()).await;
    let client = Client::new(cistern.process.url.clone());

    // The small blob is cached: the disk now has less free space than the large blob needs.
    let got = client.get_blob(REPO, &small_digest).await.unwrap();
    assert_same_bytes(&got, &small, "small blob");
    support::eventually("the small blob committed", support::patience(), || {
        cistern.blob_path(&small_digest).is_file()
    })
    .await;

    // Three clients on the large blob at once, one of them for a range that ends past the
    // point where the disk fills: all get exactly the right bytes from one upstream GET.
    let (a, b) = (client.clone(), client.clone());
    let d = large_digest.clone();
    let whole_a = tokio::spawn(async move { a.get_blob(REPO, &d).await });
    let d = large_digest.clone();
    let whole_b = tokio::spawn(async move { b.get_blob(REPO, &d).await });
    let tail = client
        .get_range(
            &blob_route(REPO, &large_digest),
            format!("bytes={}-", 18 * MIB),
        )
        .await;
    assert_eq!(tail.status, http::StatusCode::PARTIAL_CONTENT);
    let tail = tail.body.expect("range past the full disk");
    assert_same_bytes(&tail, &large[18 * MIB..], "range of the large blob");
    for (i, h) in [whole_a, whole_b].into_iter().enumerate() {
        let got = h
            .await
            .unwrap()
            .expect("the large blob despite a full disk");
        assert_same_bytes(&got, &large, &format!("client {i} of the large blob"));
    }
    assert_eq!(upstream.blob_gets(&large_digest), 1, "one upstream GET");

    // Nothing half-written is left, and the large blob was not committed.
    support::eventually("tmp/ to be empty", support::patience(), || {
        cistern.files("tmp").is_empty()
    })
    .await;
    assert!(!cistern.blob_path(&large_digest).exists());
    let log = cistern.log();
    assert!(
        log.contains("disk_full=true") && log.contains("passing the rest of the blob through"),
        "the full disk is logged:\n{log}"
    );

    // Eviction made room: the least recently used blob went, and the next pull caches the
    // large blob.
    support::eventually(
        "eviction to remove the small blob",
        support::patience(),
        || !cistern.blob_path(&small_digest).exists(),
    )
    .await;
    let again = client.get_blob(REPO, &large_digest).await.unwrap();
    assert_same_bytes(&again, &large, "the large blob, second pull");
    support::eventually("the large blob committed", support::patience(), || {
        cistern.blob_path(&large_digest).is_file()
    })
    .await;
    assert_same_bytes(
        &std::fs::read(cistern.blob_path(&large_digest)).unwrap(),
        &large,
        "the committed large blob",
    );
    assert_eq!(upstream.blob_gets(&large_digest), 2);
}

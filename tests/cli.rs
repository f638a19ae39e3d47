//! The `cistern` binary's commands, run as a user would run them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn cistern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cistern")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_config_accepts_the_example_and_names_bad_fields() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let ok = cistern(&["check-config", example]);
    assert!(ok.status.success(), "{}", text(&ok));

    let dir = tempfile::tempdir().unwrap();
    for (body, field) in [
        ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
        ("[cache]\ntag_tll = \"5m\"\n", "tag_tll"),
        (
            "[cache]\npins = [\"docker.io/library/*\", \"alpine\"]\n",
            "cache.pins[1]",
        ),
        (
            "[upstreams.a]\nurl = \"http://x\"\n[[routes]]\nregistry = \"docker.io\"\nupstreams = [\"b\"]\n",
            "routes[0].upstreams",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, body).unwrap();
        let out = cistern(&["check-config", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{body} was accepted");
        assert!(
            text(&out).contains(field),
            "{field} not named: {}",
            text(&out)
        );
    }
    let missing = cistern(&["check-config", "/nonexistent/cistern.toml"]);
    assert!(!missing.status.success());
    assert!(text(&missing).contains("/nonexistent/cistern.toml"));
}

fn put(dir: &Path, content: &[u8], stored: &[u8]) -> String {
    let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content));
    let path = dir.join("blobs/sha256").join(&hex[..2]).join(&hex);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, stored).unwrap();
    hex
}

#[test]
fn verify_removes_corrupt_blobs_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let good = put(&data, b"good", b"good");
    let bad = put(&data, b"original", b"bit rot");
    let data_arg = data.to_str().unwrap();

    let out = cistern(&["verify", "--data-dir", data_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains(&bad) && report.contains("1 files removed"),
        "{report}"
    );
    assert!(
        data.join("blobs/sha256")
            .join(&good[..2])
            .join(&good)
            .is_file()
    );
    assert!(
        !data
            .join("blobs/sha256")
            .join(&bad[..2])
            .join(&bad)
            .exists()
    );

    let again = cistern(&["verify", "--data-dir", data_arg]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("1 blobs"), "{}", text(&again));
}

#[test]
fn verify_refuses_a_cache_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _held = cistern::storage::DiskStore::open(dir.path()).unwrap();
    let out = cistern(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("in use"), "{}", text(&out));
}

#[test]
fn serve_starts_without_a_config_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cistern");
    // The start-up log line names the address the OS gave us.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut addr = None;
    let mut line = String::new();
    while addr.is_none() && Instant::now() < deadline {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split("listen=").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_string);
        }
    }
    let addr = addr.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("no listen address in the log; last line: {line}")
    });
    assert!(
        line.contains("docker.io"),
        "default route is Docker Hub: {line}"
    );

    // A ping answers as a registry does.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(
        &mut stream,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0")
    );

    // SIGTERM: a clean, prompt exit with status 0 (the grace period only waits for work).
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "cistern did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(dir.path().join("data/tmp").is_dir());
}

/// `check-config` summarises a good config without printing a secret, refuses one whose files
/// `serve` could not read (naming the key, exit status non-zero), speaks JSON with `--json`,
/// and does not panic when its reader has gone (`| head`).
#[test]
fn check_config_summarises_without_secrets_and_checks_named_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[upstream]\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword = \"hunter2\"\n\
         [access]\nanonymous = [\"ghcr.io/*\"]\n",
    )
    .unwrap();
    let out = cistern(&["check-config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("password <set>"), "{shown}");
    assert!(shown.contains("ghcr.io (default)"), "{shown}");
    let json = cistern(&["check-config", "--json", good.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["summary"]["routes"][0]["upstreams"][0]["password"],
        "<set>"
    );
    assert!(!text(&json).contains("hunter2"));

    // Files serve reads at start: missing ones are named, every one of them.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[upstream]\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword_file = \"/nonexistent/pw\"\n\
         [tls]\ncert_file = \"/nonexistent/cert\"\nkey_file = \"/nonexistent/key\"\n\
         [access]\nanonymous = [\"ghcr.io/*\"]\n",
    )
    .unwrap();
    let out = cistern(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    for key in ["upstream.password_file", "tls.cert_file", "tls.key_file"] {
        assert!(text(&out).contains(key), "{key} not named: {}", text(&out));
    }
    let json = cistern(&["check-config", "--json", bad.to_str().unwrap()]);
    assert!(!json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 3, "{v}");

    // An empty secret file exists but is refused, as serve refuses it.
    let empty = dir.path().join("empty-pw");
    std::fs::write(&empty, "\n").unwrap();
    std::fs::write(
        &bad,
        format!(
            "[upstream]\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword_file = {:?}\n\
             [access]\nanonymous = [\"ghcr.io/*\"]\n",
            empty
        ),
    )
    .unwrap();
    let out = cistern(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("upstream.password_file"),
        "{}",
        text(&out)
    );

    // A reader that has gone: the write fails, quietly.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["check-config", good.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

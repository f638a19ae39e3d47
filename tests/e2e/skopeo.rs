//! `skopeo` (1.9) invocations. Plain HTTP on loopback: `--tls-verify=false` (inspect,
//! list-tags), `--src-tls-verify=false` / `--dest-tls-verify=false` (copy) make skopeo try
//! HTTPS first and fall back to plain HTTP. Every call uses our own signature policy and an
//! empty auth file, so nothing on the host (or in `~`) changes what is tested.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::daemon::{run, run_ok};

const LIMIT: Duration = Duration::from_secs(60);

pub struct Skopeo {
    policy: PathBuf,
    auth: PathBuf,
}

impl Skopeo {
    pub fn new(dir: &Path) -> Skopeo {
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        let auth = dir.join("auth.json");
        std::fs::write(&auth, "{}").unwrap();
        Skopeo { policy, auth }
    }

    fn cmd(&self, sub: &str) -> Command {
        let mut c = Command::new(super::which("skopeo").unwrap());
        c.arg("--policy").arg(&self.policy).arg(sub);
        c.env("REGISTRY_AUTH_FILE", &self.auth);
        c
    }

    /// `skopeo copy --all --preserve-digests oci:LAYOUT:TAG docker://DEST` (optionally
    /// converting with `--format`), returning the digest skopeo reports via `--digestfile`.
    pub fn push(
        &self,
        layout: &Path,
        tag: &str,
        dest: &str,
        format: Option<&str>,
        ctx: &dyn Fn() -> String,
    ) -> String {
        let digestfile = layout.join(format!("digest-{}", dest.replace(['/', ':'], "_")));
        let mut c = self.cmd("copy");
        c.args(["--all", "--dest-tls-verify=false", "--retry-times", "0"]);
        match format {
            Some(f) => c.args(["--format", f]),
            None => c.arg("--preserve-digests"),
        };
        c.arg("--digestfile").arg(&digestfile);
        c.arg(format!("oci:{}:{tag}", layout.display()));
        c.arg(format!("docker://{dest}"));
        run_ok(&mut c, LIMIT, ctx);
        std::fs::read_to_string(&digestfile)
            .unwrap()
            .trim()
            .to_string()
    }

    /// `skopeo inspect --raw --tls-verify=false docker://REF`: the manifest bytes as served.
    pub fn inspect_raw(&self, reference: &str, ctx: &dyn Fn() -> String) -> Vec<u8> {
        let mut c = self.cmd("inspect");
        c.args(["--raw", "--tls-verify=false", "--retry-times", "0"]);
        c.arg(format!("docker://{reference}"));
        run_ok(&mut c, LIMIT, ctx).stdout
    }

    /// `skopeo inspect --tls-verify=false docker://REF` (parses the config blob too).
    pub fn inspect(&self, reference: &str, ctx: &dyn Fn() -> String) -> serde_json::Value {
        let mut c = self.cmd("inspect");
        c.args(["--tls-verify=false", "--retry-times", "0"]);
        c.arg(format!("docker://{reference}"));
        let out = run_ok(&mut c, LIMIT, ctx).stdout;
        serde_json::from_slice(&out).expect("skopeo inspect prints JSON")
    }

    /// `skopeo inspect --raw` over HTTPS, trusting only the CA certificates (`*.crt`) in
    /// `cert_dir`.
    #[allow(dead_code)] // used by tests/e2e_real_clients.rs, not by every test crate
    pub fn inspect_raw_https(
        &self,
        reference: &str,
        cert_dir: &Path,
        ctx: &dyn Fn() -> String,
    ) -> Vec<u8> {
        let mut c = self.cmd("inspect");
        c.args([
            "--raw",
            "--tls-verify=true",
            "--retry-times",
            "0",
            "--cert-dir",
        ]);
        c.arg(cert_dir);
        c.arg(format!("docker://{reference}"));
        run_ok(&mut c, LIMIT, ctx).stdout
    }

    /// `skopeo copy --all docker://REF dir:DEST` over HTTPS, trusting only the CA
    /// certificates in `cert_dir`.
    #[allow(dead_code)] // used by tests/e2e_real_clients.rs, not by every test crate
    pub fn copy_to_dir_https(
        &self,
        reference: &str,
        dest: &Path,
        cert_dir: &Path,
        ctx: &dyn Fn() -> String,
    ) {
        let mut c = self.cmd("copy");
        c.args([
            "--all",
            "--src-tls-verify=true",
            "--retry-times",
            "0",
            "--src-cert-dir",
        ]);
        c.arg(cert_dir);
        c.arg(format!("docker://{reference}"));
        c.arg(format!("dir:{}", dest.display()));
        run_ok(&mut c, LIMIT, ctx);
    }

    /// `skopeo list-tags --tls-verify=false docker://REPO`.
    pub fn list_tags(&self, repo: &str, ctx: &dyn Fn() -> String) -> Vec<String> {
        let mut c = self.cmd("list-tags");
        c.args(["--tls-verify=false", "--retry-times", "0"]);
        c.arg(format!("docker://{repo}"));
        let out = run_ok(&mut c, LIMIT, ctx).stdout;
        let v: serde_json::Value = serde_json::from_slice(&out).expect("list-tags prints JSON");
        v["Tags"]
            .as_array()
            .expect("Tags array")
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    }

    fn copy_to_dir_cmd(&self, reference: &str, dest: &Path, extra: &[&str]) -> Command {
        let mut c = self.cmd("copy");
        c.args(["--all", "--src-tls-verify=false", "--retry-times", "0"]);
        c.args(extra);
        c.arg(format!("docker://{reference}"));
        c.arg(format!("dir:{}", dest.display()));
        c
    }

    /// `skopeo copy --all --preserve-digests --src-tls-verify=false docker://REF
    /// oci:LAYOUT:NAME`: an OCI image layout as skopeo writes one, the image named `NAME`.
    #[allow(dead_code)] // used by tests/e2e_import.rs, not by every test crate
    pub fn copy_to_layout(
        &self,
        reference: &str,
        layout: &Path,
        name: &str,
        ctx: &dyn Fn() -> String,
    ) {
        let mut c = self.cmd("copy");
        c.args([
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--retry-times",
            "0",
        ]);
        c.arg(format!("docker://{reference}"));
        c.arg(format!("oci:{}:{name}", layout.display()));
        run_ok(&mut c, LIMIT, ctx);
    }

    /// `skopeo copy --all --src-tls-verify=false docker://REF dir:DEST`.
    pub fn copy_to_dir(&self, reference: &str, dest: &Path, ctx: &dyn Fn() -> String) {
        run_ok(&mut self.copy_to_dir_cmd(reference, dest, &[]), LIMIT, ctx);
    }

    /// `skopeo copy --all SOURCE dir:DEST` from a local transport (`oci:LAYOUT:NAME`,
    /// `oci-archive:TAR:NAME`): its output, whatever the outcome.
    #[allow(dead_code)] // used by tests/e2e_export.rs, not by every test crate
    pub fn try_copy_local_to_dir(&self, source: &str, dest: &Path) -> Output {
        let mut c = self.cmd("copy");
        c.args(["--all", "--retry-times", "0"]);
        c.arg(source);
        c.arg(format!("dir:{}", dest.display()));
        run(&mut c, LIMIT)
    }

    /// The same copy, expected to fail: its output, whatever the outcome.
    pub fn try_copy_to_dir(&self, reference: &str, dest: &Path) -> Output {
        self.try_copy_to_dir_with(reference, dest, &[])
    }

    /// The same copy with `extra` arguments (e.g. `--src-creds USER:PASSWORD`): its output,
    /// whatever the outcome.
    pub fn try_copy_to_dir_with(&self, reference: &str, dest: &Path, extra: &[&str]) -> Output {
        run(&mut self.copy_to_dir_cmd(reference, dest, extra), LIMIT)
    }

    /// `skopeo inspect --raw`, expected to fail: its output, whatever the outcome.
    pub fn try_inspect_raw(&self, reference: &str) -> Output {
        let mut c = self.cmd("inspect");
        c.args(["--raw", "--tls-verify=false", "--retry-times", "0"]);
        c.arg(format!("docker://{reference}"));
        run(&mut c, LIMIT)
    }
}

//! The commit idem is built from, for `idem --version` and
//! `idem_build_info` (src/version.rs): `IDEM_COMMIT` when set (the
//! container build has no .git: the Dockerfile's build argument), else
//! git's HEAD, else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=IDEM_COMMIT");
    let commit = std::env::var("IDEM_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_head)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=IDEM_COMMIT={}", commit.trim());
}

/// HEAD's abbreviated hash; the files that move with it are watched, so a
/// new commit rebuilds (only those that exist: a missing one would rerun
/// this script at every build).
fn git_head() -> Option<String> {
    let head = Path::new(".git/HEAD");
    if head.is_file() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        let text = std::fs::read_to_string(head).ok()?;
        if let Some(reference) = text.strip_prefix("ref: ") {
            let loose = Path::new(".git").join(reference.trim());
            let watched = if loose.is_file() {
                loose
            } else {
                Path::new(".git/packed-refs").to_path_buf()
            };
            if watched.is_file() {
                println!("cargo:rerun-if-changed={}", watched.display());
            }
        }
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let hash = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !hash.trim().is_empty()).then(|| hash.trim().to_string())
}

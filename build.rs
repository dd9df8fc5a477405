//! What the build derives:
//! - the commit idem is built from, for `idem --version` and
//!   `idem_build_info` (src/version.rs): `IDEM_COMMIT` when set (the
//!   container build has no .git: the Dockerfile's build argument), else
//!   git's HEAD, else `unknown`;
//! - each config key's doc, from its comment in config/default.toml (where
//!   every key is documented once): `$OUT_DIR/config-docs/<section>.<key>.md`,
//!   which the key's field includes (`key_doc!` in src/config/mod.rs).

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
    config_docs();
}

/// Writes each key's comment in config/default.toml to its own file. A key
/// without a comment of its own shares the block above it: its doc says so.
fn config_docs() {
    println!("cargo:rerun-if-changed=config/default.toml");
    let defaults = std::fs::read_to_string("config/default.toml").expect("config/default.toml");
    let dir = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("config-docs");
    // Afresh: a key taken out of config/default.toml leaves no doc behind.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("config-docs directory");
    let (mut section, mut block, mut head) = (String::new(), Vec::<String>::new(), None);
    let write = |section: &str, key: &str, block: &mut Vec<String>, head: &Option<String>| {
        let doc = if block.is_empty() {
            let head = head.as_deref().unwrap_or_default();
            format!("Described with `{head}` (config/default.toml has one comment for the group).")
        } else {
            block.join("\n")
        };
        std::fs::write(dir.join(format!("{section}.{key}.md")), doc).expect("a key's doc");
        block.clear();
    };
    for line in defaults.lines().map(str::trim) {
        if let Some(comment) = line.strip_prefix('#') {
            block.push(comment.strip_prefix(' ').unwrap_or(comment).to_string());
        } else if let Some(name) = line.strip_prefix('[').map(|l| l.trim_matches(['[', ']'])) {
            match name.split_once('.') {
                Some((sec, key)) => write(sec, key, &mut block, &head),
                None => section = name.to_string(),
            }
            block.clear();
            head = None;
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !block.is_empty() {
                head = Some(key.to_string());
            }
            write(&section, key, &mut block, &head);
        } else {
            block.clear();
        }
    }
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

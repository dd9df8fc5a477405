//! The README's "Use it" section, run as written against the local
//! services: a newcomer who types those lines gets what they promise, each
//! exiting 0. The lines are read from README.md, so the test follows the
//! README and the README cannot drift from what idem does.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The shell lines of the first ```sh block after "## Use it".
fn use_it_lines() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = &readme[readme
        .find("## Use it")
        .expect("README has a Use it section")..];
    let block = &section[section.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").expect("the block ends")];
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `idem …` as a command on the test binary, run in `dir` with `env`.
fn command(words: &[&str], dir: &Path, env: &[(String, String)]) -> Command {
    assert_eq!(words[0], "idem", "every line runs idem: {words:?}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args(&words[1..])
        .current_dir(dir)
        .env("IDEM__KAFKA__BROKERS", brokers())
        .envs(redis_env(&redis_url()))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_use_it_commands_work_as_written() {
    // A directory of its own (reconcile writes its report to the working
    // directory) with the repository's topic declarations in it.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("readme"));
    std::fs::create_dir_all(dir.join("topics")).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/topics")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join("topics").join(path.file_name().unwrap())).unwrap();
    }
    // Not in the README, which runs on the default port: the test's own port,
    // as tests run in parallel.
    let mut env = vec![(
        "IDEM__METRICS__LISTEN".to_string(),
        format!("127.0.0.1:{}", free_port()),
    )];
    let lines = use_it_lines();
    assert!(
        lines.len() >= 10,
        "the section lost its commands: {lines:?}"
    );
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0] == "export" {
            for pair in &words[1..] {
                let (k, v) = pair.split_once('=').expect("export K=V");
                env.push((k.to_string(), v.to_string()));
            }
            continue;
        }
        if words == ["idem", "run"] {
            run_until_caught_up(&words, &dir, &env).await;
            continue;
        }
        let out = command(&words, &dir, &env).output().expect("run idem");
        assert_eq!(
            out.status.code(),
            Some(0),
            "`{line}` should exit 0\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "`{line}` printed nothing");
    }
    assert!(
        dir.join("reconcile-report.json").exists(),
        "reconcile wrote its report where the README says"
    );
}

/// `idem run` until the group has committed the whole topic, then SIGTERM:
/// the README promises it drains, commits and exits 0.
async fn run_until_caught_up(words: &[&str], dir: &Path, env: &[(String, String)]) {
    let var = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let (topic, group) = (
        var("IDEM__KAFKA__TOPICS").expect("the README exports the topic"),
        var("IDEM__KAFKA__GROUP_ID").expect("the README exports the group"),
    );
    let log = dir.join("idem-run.log");
    let mut child = command(words, dir, env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start idem run");
    let partitions = partition_count(&topic).await;
    wait_caught_up(&group, &topic, partitions, Duration::from_secs(120)).await;
    assert!(signal(child.id(), "-TERM"));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "idem run should exit 0 on SIGTERM: {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The partition count of `topic` as the brokers report it.
async fn partition_count(topic: &str) -> i32 {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = idem::kafka::base_config(&kafka()).create().unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0].partitions().len() as i32
    })
    .await
    .unwrap()
}

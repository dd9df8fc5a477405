//! The group tools under both group protocols, and what `idem replay`
//! refuses: a running group of the consumer protocol (KIP-848) is described
//! with its members, so replay refuses it as it refuses a classic one; an
//! unknown group, an offset past the end and a skip are refused; the moves
//! of Kafka's own tool (to the end, shifts, several topics in one plan).

mod common;

use std::time::Duration;

use common::*;

const CATCH_UP: Duration = Duration::from_secs(120);

/// `idem <args>` with the test's prefix: (exit code, stdout, stderr).
fn tool(prefix: &str, args: &[&str]) -> (i32, String, String) {
    idem_tool_output(args, prefix)
}

/// A running idem of `protocol`: `inspect group` names its member and
/// partitions, replay's dry run says --execute would refuse, and --execute
/// refuses with the members named, committing nothing; once it stopped,
/// the group is found and replay moves it.
async fn a_running_group_is_seen(protocol: &str) {
    let topic = unique(&format!("group-tools-{protocol}"));
    create_topic(&topic, 2).await;
    produce(&topic, &sample_stream(&topic, 100)).await;
    let opts = IdemOpts::new(&topic, &topic, &topic).with("IDEM__KAFKA__GROUP_PROTOCOL", protocol);
    let idem = Idem::spawn(&opts);
    wait_all_hold_partitions(std::slice::from_ref(&idem), "before the tools").await;
    wait_caught_up(&topic, &topic, 2, CATCH_UP).await;

    let (code, out, err) = tool(&topic, &["inspect", "group", &topic, "--topic", &topic]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 member(s)") && out.contains(&format!("{protocol} protocol")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{topic}[0, 1]")),
        "the member's partitions: {out}"
    );

    let replay = [
        "replay",
        "--topic",
        &topic,
        "--group",
        &topic,
        "--to-earliest",
    ];
    let (code, _, err) = tool(&topic, &replay);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--execute would refuse") && err.contains("1 active member(s)"),
        "{err}"
    );
    let before = committed(&topic, &topic, 2).await;
    let (code, _, err) = tool(&topic, &[&replay[..], &["--execute"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Stop every idem instance"), "{err}");
    assert_eq!(
        committed(&topic, &topic, 2).await,
        before,
        "nothing committed"
    );
    idem.terminate().await;

    // Stopped, the group is found (not taken for a typo) and moved.
    wait_group_empty(&topic, &topic).await;
    let (code, _, err) = tool(&topic, &[&replay[..], &["--execute"]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&topic, &topic, 2).await, vec![0, 0]);
}

fn sample_stream(prefix: &str, events: usize) -> Vec<idem::tools::sample::SampleRecord> {
    idem::tools::sample::generate(&idem::tools::sample::SampleSpec {
        events,
        entities: 10,
        duplicate_ratio: 0.0,
        out_of_order_ratio: 0.0,
        delete_ratio: 0.0,
        data_bytes: 8,
        seed: 91,
        prefix: prefix.to_string(),
        zipf: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_group_is_seen_by_the_tools_under_the_classic_protocol() {
    a_running_group_is_seen("classic").await;
}

/// Found from outside: `inspect group` printed `(Dead), 0 member(s)` and
/// `replay --execute` failed with a raw `UnknownMemberId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_group_is_seen_by_the_tools_under_the_consumer_protocol() {
    a_running_group_is_seen("consumer").await;
}

/// An unknown group (a typo) is refused unless --create-group; an offset
/// past a partition's end is refused naming the end; --to-latest is a skip;
/// --shift-by moves from the commit; several topics move in one plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_what_it_cannot_do_and_has_kafkas_moves() {
    let topic = unique("group-tools-moves");
    let other = format!("{topic}-b");
    create_topic(&topic, 1).await;
    create_topic(&other, 1).await;
    produce(&topic, &sample_stream(&topic, 18)).await;
    produce(&other, &sample_stream(&other, 30)).await;
    let group = topic.clone();
    commit_as_a_plain_client(&group, &topic, &[10]);
    commit_as_a_plain_client(&group, &other, &[30]);

    let typo = format!("{group}-typo");
    let earliest = |g: &str| -> Vec<String> {
        [
            "replay",
            "--topic",
            &topic,
            "--group",
            g,
            "--to-earliest",
            "--execute",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let (code, _, err) = tool(&topic, &as_refs(&earliest(&typo)));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not exist") && err.contains("--create-group"),
        "{err}"
    );
    assert_eq!(
        committed(&typo, &topic, 1).await,
        vec![-1],
        "no group created"
    );
    let mut create = earliest(&typo);
    create.push("--create-group".into());
    let (code, _, err) = tool(&topic, &as_refs(&create));
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&typo, &topic, 1).await, vec![0]);

    let (code, _, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &group,
            "--to-offset",
            "0:100",
            "--execute",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("past the end") && err.contains("next offset is 18"),
        "{err}"
    );
    assert_eq!(
        committed(&group, &topic, 1).await,
        vec![10],
        "nothing moved"
    );

    let latest = [
        "replay",
        "--topic",
        &topic,
        "--group",
        &group,
        "--to-latest",
        "--execute",
    ];
    let (code, _, err) = tool(&topic, &latest);
    assert_eq!(code, 2, "a skip: {err}");
    assert!(err.contains("--allow-skip"), "{err}");
    let (code, _, err) = tool(&topic, &[&latest[..], &["--allow-skip"]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&group, &topic, 1).await, vec![18]);

    let (code, _, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--group",
            &group,
            "--shift-by",
            "-5",
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(committed(&group, &topic, 1).await, vec![13]);

    let (code, out, err) = tool(
        &topic,
        &[
            "replay",
            "--topic",
            &topic,
            "--topic",
            &other,
            "--group",
            &group,
            "--to-earliest",
            "--execute",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("13 records will be read again")
            && out.contains("30 records will be read again"),
        "{out}"
    );
    assert_eq!(committed(&group, &topic, 1).await, vec![0]);
    assert_eq!(committed(&group, &other, 1).await, vec![0]);
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

//! `idem gateway` against real HTTP, a real broker, a real Redis and a
//! real `idem run`: each write's effect once whatever the client's
//! retries, the answers of the Idempotency-Key draft, reads that see the
//! reader's own writes, two gateways on one entity, a crash between the
//! broker's acknowledgement and the stored response, and a Redis flushed
//! under the gateway.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use idem::gateway::binding::{Bindings, Bound};
use idem::gateway::request::{self, token_hash, Accepted, Intent};
use idem::http::Reply;
use idem::store::progress::ProgressStore;
use idem::store::KeyLayout;
use serde_json::Value;

const CATCH_UP: Duration = Duration::from_secs(120);
const CALLERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

/// A dense topic with counters, an `idem run` applying it, and the
/// gateways in front of it.
struct Deployment {
    topic: String,
    redis_url: String,
    env: Vec<(String, String)>,
    idem: Option<Idem>,
    log_dir: PathBuf,
}

/// One `idem gateway` process.
struct Gateway {
    process: IdemProcess,
    port: u16,
}

fn token(caller: &str) -> String {
    format!("{caller}-token")
}

impl Deployment {
    /// `extra`: settings of both `idem run` and the gateways.
    async fn start(name: &str, redis_url: String, extra: &[(&str, &str)]) -> Deployment {
        let topic = unique(name);
        create_topic(&topic, 2).await;
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("gateway"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let config = log_dir.join("idem.toml");
        std::fs::write(
            &config,
            format!(
                r#"[[effects]]
topic = "{topic}"
types = ["deposit"]
counters = [{{ field = "balance", from = "/amount", scale = 2 }}]

[[effects]]
topic = "{topic}"
types = ["refund"]
state = "keep"
counters = [{{ field = "balance", from = "/amount", scale = 2, subtract = true }}]
"#
            ),
        )
        .unwrap();
        let tokens = log_dir.join("tokens");
        let lines: Vec<String> = CALLERS
            .iter()
            .map(|c| {
                let topics = if *c == "carol" { "another-topic" } else { "*" };
                format!("{c} {} {topics}", token_hash(&token(c)))
            })
            .collect();
        std::fs::write(&tokens, lines.join("\n")).unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("IDEM_CONFIG".into(), config.display().to_string()),
            ("IDEM__DEDUPE__DENSE_SEQ_TOPICS".into(), topic.clone()),
            ("IDEM__STATE__ORDER".into(), "per_field".into()),
            ("IDEM__GATEWAY__TOPICS".into(), topic.clone()),
            (
                "IDEM__GATEWAY__TOKENS_FILE".into(),
                tokens.display().to_string(),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut d = Deployment {
            topic,
            redis_url,
            env,
            idem: None,
            log_dir,
        };
        d.idem = Some(d.spawn_idem());
        d
    }

    fn spawn_idem(&self) -> Idem {
        let mut opts = IdemOpts::new(&self.topic, &self.topic, &self.topic);
        opts.redis_url = self.redis_url.clone();
        for (k, v) in &self.env {
            opts = opts.with(k, v);
        }
        Idem::spawn(&opts)
    }

    /// A gateway, once it admits writes; `extra` only for this one.
    async fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        self.gateway_at(free_port(), extra).await
    }

    /// A gateway listening on `port` (another's, after it was killed).
    async fn gateway_at(&self, port: u16, extra: &[(&str, &str)]) -> Gateway {
        let metrics = free_port();
        let mut cmd = IdemCommand::new(
            std::path::Path::new(env!("CARGO_BIN_EXE_idem")),
            &brokers(),
            &self.topic,
            &self.topic,
        )
        .clean_env()
        .redis(&self.redis_url, redis_mode(&self.redis_url), &self.topic)
        .metrics_port(metrics)
        .subcommand("gateway")
        .env("IDEM__GATEWAY__LISTEN", &format!("127.0.0.1:{port}"));
        for (k, v) in self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.iter().copied())
        {
            cmd = cmd.env(k, v);
        }
        let log = self.log_dir.join(format!("gateway-{port}.log"));
        let process = IdemProcess::start(&cmd, &log, metrics).expect("spawn idem gateway");
        wait_until("the gateway admits writes", CATCH_UP, || async {
            http_get(port, "/readyz").await.as_deref() == Some("ready\n")
        })
        .await;
        Gateway { process, port }
    }

    /// Sends `body` under `key` to a gateway started with
    /// `IDEM_GATEWAY_FAULT=fault`, which exits before it answers: no
    /// answer, and the process gone.
    async fn post_to_a_gateway_that_dies(&self, fault: &str, entity: &str, key: &str, body: &str) {
        let doomed = self.gateway(&[("IDEM_GATEWAY_FAULT", fault)]).await;
        let lost = doomed
            .post(&self.topic, entity, "alice", Some(key), body)
            .await;
        assert!(
            lost.is_none(),
            "the gateway died ({fault}) before answering: {lost:?}"
        );
        assert!(doomed
            .process
            .wait_exit(Duration::from_secs(10))
            .await
            .is_ok());
    }

    async fn bindings(&self) -> Bindings {
        Bindings::new(
            redis_conn(&self.redis_url).await,
            KeyLayout::new(&self.topic),
        )
    }
}

impl Gateway {
    async fn post(
        &self,
        topic: &str,
        entity: &str,
        caller: &str,
        key: Option<&str>,
        body: &str,
    ) -> Option<Reply> {
        let auth = format!("Bearer {}", token(caller));
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        let path = format!("/v1/topics/{topic}/entities/{entity}/events");
        idem::http::send(self.port, "POST", &path, &headers, body.as_bytes().to_vec()).await
    }

    /// A write as a client that follows docs/gateway.md's retry policy
    /// sends it: the same key and body again on no answer, `409`, `429`
    /// and `503`, after `Retry-After`; its final answer.
    async fn post_until_final(&self, topic: &str, entity: &str, key: &str, body: &str) -> Reply {
        for _ in 0..60 {
            let reply = self.post(topic, entity, "alice", Some(key), body).await;
            match reply {
                Some(r) if !matches!(r.status, 409 | 429 | 503) => return r,
                Some(r) => {
                    let after: u64 = r
                        .header("retry-after")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(after)).await;
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("no final answer for key {key} after 60 tries");
    }

    async fn get(&self, topic: &str, entity: &str, query: &str, extra: &[(&str, &str)]) -> Reply {
        let auth = format!("Bearer {}", token("alice"));
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        let path = format!("/v1/topics/{topic}/entities/{entity}{query}");
        idem::http::send(self.port, "GET", &path, &headers, Vec::new())
            .await
            .expect("the gateway answers")
    }

    /// Waits for each of `entity`'s seqs `1..=through` and asserts it
    /// counted: applied, late or partial, never dead-lettered (a seq the
    /// dense rule closed) or only known as decided.
    async fn assert_each_seq_counted(&self, topic: &str, entity: &str, through: u64) {
        for n in 1..=through {
            let decided = self.read_at(topic, entity, n).await["decided"].clone();
            assert!(
                ["applied", "late", "partial"].contains(&decided["outcome"].as_str().unwrap_or("")),
                "seq {n}: {decided}"
            );
        }
    }

    /// The entity once seq `n` is decided.
    async fn read_at(&self, topic: &str, entity: &str, n: u64) -> Value {
        let reply = self
            .get(topic, entity, &format!("?min_seq={n}&timeout=5s"), &[])
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        serde_json::from_slice(&reply.body).unwrap()
    }
}

fn deposit(amount: &str) -> String {
    format!(r#"{{"type":"deposit","data":{{"amount":"{amount}"}}}}"#)
}

fn accepted(reply: &Reply) -> Accepted {
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// The draft's answers, one by one, through the real server: a new key,
/// its retry (the stored bytes), another body (422), no key (400), a body
/// too large (413), unknown and unauthorised callers, another caller's
/// key, a key in flight (409), an entity with 32 writes unacknowledged
/// (429), a caller over its rate (429); and reads with ETag and 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_answers_each_case_once() {
    let d = Deployment::start("gw-cases", redis_url(), &[("IDEM__GATEWAY__LEASE", "2s")]).await;
    let gw = d
        .gateway(&[
            ("IDEM__GATEWAY__MAX_BODY_BYTES", "2048"),
            ("IDEM__GATEWAY__RATE_PER_CALLER", "40"),
        ])
        .await;
    let t = d.topic.as_str();

    let first = gw
        .post(t, "acct:1", "alice", Some("k1"), &deposit("2.50"))
        .await
        .unwrap();
    let a = accepted(&first);
    assert_eq!(
        (a.seq, a.id.as_str(), a.entity.as_str()),
        (1, "gw-1", "acct:1")
    );
    assert!(first.header("idempotent-replayed").is_none());
    let again = gw
        .post(
            t,
            "acct:1",
            "alice",
            Some("k1"),
            r#"{ "data": {"amount": "2.50"}, "type": "deposit" }"#,
        )
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.body.clone()),
        (202, first.body.clone()),
        "the stored response, byte for byte"
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));

    let other = gw
        .post(t, "acct:1", "alice", Some("k1"), &deposit("3.00"))
        .await
        .unwrap();
    assert_eq!(other.status, 422);
    assert_eq!(
        other.header("content-type"),
        Some("application/problem+json")
    );
    assert!(String::from_utf8_lossy(&other.body).contains("k1"));
    let big = format!(r#"{{"data":{{"x":"{}"}}}}"#, "y".repeat(4096));
    let (pay, k1) = (deposit("2.50"), Some("k1"));
    for (caller, key, body, status, why) in [
        ("alice", None, deposit("1.00"), 400, "no Idempotency-Key"),
        (
            "alice",
            Some("k-big"),
            big,
            413,
            "over gateway.max_body_bytes",
        ),
        ("mallory", k1, pay.clone(), 401, "no known token"),
        ("carol", k1, pay.clone(), 403, "a topic carol may not use"),
    ] {
        let reply = gw.post(t, "acct:1", caller, key, &body).await.unwrap();
        assert_eq!(reply.status, status, "{why}");
    }
    let invalid = gw
        .post(
            t,
            "acct:1",
            "alice",
            Some("k-bad"),
            r#"{"type":"deposit","data":{"amount":"lots"}}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        invalid.status, 422,
        "what idem would dead-letter is refused before it is bound"
    );
    // Bob's k1 is not Alice's: a binding of its own, a seq of its own.
    let b = accepted(
        &gw.post(t, "acct:1", "bob", Some("k1"), &deposit("2.50"))
            .await
            .unwrap(),
    );
    assert_eq!(b.seq, 2);

    // A key in flight: its binding held (by this test, as by a request
    // still producing) answers 409; once the lease lapses the sweeper
    // produces the bound event and the key answers its stored response.
    let bindings = d.bindings().await;
    let mut markers = ProgressStore::new(bindings.conn(), KeyLayout::new(t));
    let epoch = markers.agreed_epoch().await.unwrap().unwrap();
    let body = Intent::parse(deposit("1.25").as_bytes())
        .unwrap()
        .canonical();
    // Binds `key` of alice for `entity` as a request would, and holds it
    // (a 2 s lease nobody renews).
    let hold = |entity: &'static str, key: String| {
        let (bindings, epoch, body) = (&bindings, &epoch, &body);
        async move {
            let key_hash = request::key_hash("alice", &key);
            let fp = request::fingerprint("POST", &request::write_route(t, entity), body);
            let (window, lease) = (Duration::from_secs(3600), Duration::from_secs(2));
            let bind = bindings.bind(epoch, entity, &key_hash, &fp, t, body, window, lease);
            bind.await.unwrap()
        }
    };
    let bound = hold("acct:1", "k-held".to_string()).await;
    assert_eq!(bound, Bound::New { seq: 3, token: 1 });
    let busy = gw
        .post(t, "acct:1", "alice", Some("k-held"), &deposit("1.25"))
        .await
        .unwrap();
    assert_eq!(busy.status, 409);
    assert!(busy.header("retry-after").is_some());
    wait_until(
        "the sweeper stores the held key's response",
        CATCH_UP,
        || async {
            gw.post(t, "acct:1", "alice", Some("k-held"), &deposit("1.25"))
                .await
                .is_some_and(|r| r.status == 202)
        },
    )
    .await;
    let swept = accepted(
        &gw.post(t, "acct:1", "alice", Some("k-held"), &deposit("1.25"))
            .await
            .unwrap(),
    );
    assert_eq!(swept.seq, 3);

    // 32 bound seqs unacknowledged: the 33rd claim on the entity waits.
    for i in 0..idem::gateway::MAX_UNACKED {
        let b = hold("acct:2", format!("k-full-{i}")).await;
        assert_eq!(
            b,
            Bound::New {
                seq: i + 1,
                token: 1
            }
        );
    }
    let full = gw
        .post(t, "acct:2", "alice", Some("k-33"), &deposit("1.25"))
        .await
        .unwrap();
    assert_eq!(full.status, 429, "{}", String::from_utf8_lossy(&full.body));
    wait_until("the sweeper produces the 32", CATCH_UP, || async {
        gw.post(t, "acct:2", "alice", Some("k-33"), &deposit("1.25"))
            .await
            .is_some_and(|r| r.status == 202)
    })
    .await;
    // A read waits for its own seq only: wait for each of the 33.
    for n in 1..=33 {
        gw.read_at(t, "acct:2", n).await;
    }
    let state = gw.read_at(t, "acct:2", 33).await;
    assert_eq!(
        state["counters"]["balance"], "41.25",
        "33 deposits of 1.25, each once: {state}"
    );

    // Reads: the state once seq 3 is decided, its ETag, and 304.
    let state = gw.read_at(t, "acct:1", 3).await;
    assert_eq!(state["counters"]["balance"], "6.25", "{state}");
    assert_eq!(state["decided"]["outcome"], "applied");
    let plain = gw.get(t, "acct:1", "", &[]).await;
    let tag = plain.header("etag").unwrap().to_string();
    assert_eq!(
        gw.get(t, "acct:1", "", &[("if-none-match", &tag)])
            .await
            .status,
        304
    );
    let unseen = gw.get(t, "acct:1", "?min_seq=99&timeout=200ms", &[]).await;
    assert_eq!(
        unseen.status, 504,
        "a seq never written is not waited out forever"
    );

    // Dave over his rate on this instance: refused with Retry-After.
    let mut limited = 0;
    for _ in 0..80 {
        let auth = format!("Bearer {}", token("dave"));
        let r = idem::http::send(
            gw.port,
            "GET",
            &format!("/v1/topics/{t}/entities/acct:1"),
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await
        .unwrap();
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
            limited += 1;
        }
    }
    assert!(limited > 0, "80 requests at once against a rate of 40/s");

    // The OpenAPI description is the server's: each documented operation is
    // served with one of its documented statuses, and no other method is.
    let api: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/api/gateway.openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let auth = format!("Bearer {}", token("alice"));
    let body = deposit("0.50");
    for (path, ops) in api["paths"].as_object().unwrap() {
        let concrete = path.replace("{topic}", t).replace("{entity}", "acct:api");
        for method in ["get", "post", "put", "delete", "patch"] {
            let (headers, payload) = match method {
                "post" => (
                    vec![
                        ("authorization", auth.as_str()),
                        ("idempotency-key", "api-1"),
                    ],
                    body.as_bytes().to_vec(),
                ),
                _ => (vec![("authorization", auth.as_str())], Vec::new()),
            };
            let r = idem::http::send(
                gw.port,
                &method.to_uppercase(),
                &concrete,
                &headers,
                payload,
            )
            .await
            .unwrap();
            match ops.get(method) {
                Some(op) => assert!(
                    op["responses"].get(r.status.to_string()).is_some(),
                    "{method} {path}: {} is not documented",
                    r.status
                ),
                None => assert_eq!(
                    r.status, 405,
                    "{method} {path} is not documented, so not served"
                ),
            }
        }
    }
    // The gateway's dashboard and alert rules query only series it exports.
    let exposed = gw.process.metrics().await.expect("the gateway's /metrics");
    for file in [
        "deploy/grafana/dashboards/gateway.json",
        "deploy/prometheus/gateway-alerts.yml",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .match_indices("idem_gateway_")
            .map(|(at, _)| {
                let rest = &text[at..];
                &rest[..rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len())]
            })
            .collect();
        assert!(names.len() >= 3, "{file}: {names:?}");
        for name in names {
            assert!(
                exposed.contains(&format!("\n{name}")),
                "{file} queries {name}, which the gateway does not export"
            );
        }
    }
    gw.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

/// The gateway's alert rules are valid Prometheus rules.
#[test]
fn the_gateway_alert_rules_pass_promtool() {
    assert_promtool_passes(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/gateway-alerts.yml"
    ));
}

/// The fencing token, against real Redis scripts: a holder whose lease was
/// taken over cannot store its answer over the newer holder's, and after
/// the newer one stored, the old one finds the key done. The binding (its
/// seq) never changes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_cannot_store_over_a_newer_one() {
    use idem::gateway::binding::Kept;
    let prefix = unique("gw-fence");
    let layout = KeyLayout::new(&prefix);
    let conn = redis_conn(&redis_url()).await;
    let epoch = ProgressStore::new(conn.clone(), layout.clone())
        .establish_epoch()
        .await
        .unwrap();
    let bindings = Bindings::new(conn, layout.clone());
    let (entity, key_hash, fp, body) = ("acct:f", "k".repeat(32), "f".repeat(32), "{}");
    let binding = layout.entity(entity).gateway_binding(&key_hash);
    let lease = Duration::from_millis(1);
    let bind = || {
        bindings.bind(
            &epoch,
            entity,
            &key_hash,
            &fp,
            "t",
            body,
            Duration::from_secs(60),
            lease,
        )
    };
    assert_eq!(bind().await.unwrap(), Bound::New { seq: 1, token: 1 });
    // The first holder's 1 ms lease lapses: the next request takes it over.
    let retaken = std::sync::Mutex::new(None);
    wait_until(
        "the lease is taken over",
        Duration::from_secs(10),
        || async {
            let b = bind().await.unwrap();
            let taken = matches!(b, Bound::Retake { .. });
            *retaken.lock().unwrap() = Some(b);
            taken
        },
    )
    .await;
    let Some(Bound::Retake { seq, token, .. }) = retaken.into_inner().unwrap() else {
        unreachable!()
    };
    assert_eq!((seq, token), (1, 2), "the same seq, a newer token");
    assert_eq!(
        bindings
            .keep(entity, &binding, 1, Some((0, 10)))
            .await
            .unwrap(),
        Kept::Fenced
    );
    assert_eq!(
        bindings
            .keep(entity, &binding, 2, Some((0, 11)))
            .await
            .unwrap(),
        Kept::Stored
    );
    assert_eq!(
        bindings
            .keep(entity, &binding, 1, Some((0, 10)))
            .await
            .unwrap(),
        Kept::Done
    );
    match bind().await.unwrap() {
        Bound::Stored { seq, offset, .. } => {
            assert_eq!((seq, offset), (1, 11), "the newer holder's answer")
        }
        other => panic!("{other:?}"),
    }
}

/// A retry storm: 50 clients each send their write 10 times, with random
/// client-side timeouts, and the gateway is SIGKILLed mid-storm and
/// started again; then each client retries until its final answer. Every
/// key's effect happened once (balances equal the oracle), every `202` of
/// a key is the same bytes (one seq, one fingerprint), no seq belongs to
/// two keys, and each entity's seqs are 1..=n, all decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_storm_across_a_gateway_kill_writes_each_key_once() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = Deployment::start("gw-storm", redis_url(), &[("IDEM__GATEWAY__LEASE", "2s")]).await;
    let port = free_port();
    let rate = [("IDEM__GATEWAY__RATE_PER_CALLER", "100000")];
    let front = d.gateway_at(port, &rate).await;
    let t = d.topic.clone();
    // The kill comes mid-storm: once 10 writes were answered 202. Clients
    // storm on until it came (at least 10 sends each), with a patience that
    // grows as a backing-off client's does: on a loaded machine a first
    // write can take longer than a whole storm of short patiences.
    let answered = AtomicUsize::new(0);
    let killed = std::sync::atomic::AtomicBool::new(false);
    let clients: Vec<_> = (0..50u64)
        .map(|i| {
            let (front, t, answered, killed) = (&front, t.clone(), &answered, &killed);
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i);
                let (entity, key, body) = (
                    format!("acct:{}", i % 10),
                    format!("storm-{i}"),
                    deposit(&format!("{}.00", i + 1)),
                );
                let mut answers = Vec::new();
                let mut sends = 0u64;
                while sends < 10 || !killed.load(Ordering::SeqCst) {
                    let grown = 1 + (sends / 10).min(20);
                    let patience = Duration::from_millis(rng.random_range(2..150) * grown);
                    sends += 1;
                    if let Ok(Some(r)) = tokio::time::timeout(
                        patience,
                        front.post(&t, &entity, "alice", Some(&key), &body),
                    )
                    .await
                    {
                        if r.status == 202 {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        answers.push(r);
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
                }
                (entity, key, body, answers)
            }
        })
        .collect();
    let storm = futures_util::future::join_all(clients);
    let kill = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::SeqCst) < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "no 10 writes answered within a minute"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(signal(front.process.pid(), "-KILL"), "kill -KILL failed");
        killed.store(true, Ordering::SeqCst);
    };
    let (sent, ()) = tokio::join!(storm, kill);
    let again = d.gateway_at(port, &rate).await;
    let mut balances: BTreeMap<String, u64> = BTreeMap::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut accepted_202 = 0;
    for (entity, key, body, mut answers) in sent {
        answers.push(again.post_until_final(&t, &entity, &key, &body).await);
        let done: Vec<&Reply> = answers.iter().filter(|r| r.status == 202).collect();
        accepted_202 += done.len();
        assert!(
            done.windows(2).all(|w| w[0].body == w[1].body),
            "key {key}: every 202 the same bytes"
        );
        let a = accepted(done.last().unwrap());
        assert_eq!(a.entity, entity);
        for r in &answers {
            assert!(matches!(r.status, 202 | 409 | 503), "key {key}: {r:?}");
        }
        *balances.entry(entity.clone()).or_default() +=
            key["storm-".len()..].parse::<u64>().unwrap() + 1;
        seqs.entry(entity).or_default().push(a.seq);
    }
    assert!(accepted_202 > 50, "the storm's retries were answered too");
    for (entity, mut given) in seqs {
        given.sort();
        assert_eq!(
            given,
            (1..=given.len() as u64).collect::<Vec<_>>(),
            "{entity}: one key per seq, none skipped"
        );
        for n in 1..=given.len() as u64 {
            again.read_at(&t, &entity, n).await;
        }
        let state = again.read_at(&t, &entity, 1).await;
        assert_eq!(
            state["counters"]["balance"],
            format!("{}.00", balances[&entity]),
            "{entity}: each key's deposit once"
        );
    }
    again.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

/// A saga's compensation through the front door: a refund is another
/// write with its own key, applied once like the payment it undoes, however
/// often either is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_compensates_a_payment_once_each() {
    let mut d = Deployment::start("gw-saga", redis_url(), &[]).await;
    let gw = d.gateway(&[]).await;
    let t = d.topic.as_str();
    let refund = r#"{"type":"refund","data":{"amount":"30.00"}}"#;
    for _ in 0..3 {
        accepted(
            &gw.post(
                t,
                "order:7",
                "alice",
                Some("pay-order-7"),
                &deposit("30.00"),
            )
            .await
            .unwrap(),
        );
        accepted(
            &gw.post(
                t,
                "order:7",
                "alice",
                Some("pay-order-7-fee"),
                &deposit("2.00"),
            )
            .await
            .unwrap(),
        );
        accepted(
            &gw.post(t, "order:7", "alice", Some("refund-order-7"), refund)
                .await
                .unwrap(),
        );
    }
    let state = gw.read_at(t, "order:7", 3).await;
    assert_eq!(
        state["counters"]["balance"], "2.00",
        "paid 32, refunded 30, each once: {state}"
    );
    assert_eq!(state["seq"], 3);
    gw.process.terminate().await;
    d.idem.take().unwrap().terminate().await;

    // The operator's reconcile judges the entities against the log and
    // leaves the gateway's keys alone, even with --delete-extra; the key
    // still answers its stored response afterwards.
    wait_group_empty(t, t).await;
    let env: Vec<(&str, &str)> = d
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, report) = reconcile_report(t, &["--repair", "--delete-extra"], &env);
    assert_eq!(code, Some(0), "no divergence: {report}");
    let key = KeyLayout::new(t)
        .entity("order:7")
        .gateway_binding(&request::key_hash("alice", "refund-order-7"));
    let mut conn = redis_conn(&d.redis_url).await;
    let kept: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(kept, "reconcile left the binding {key}");
    let idem = d.spawn_idem();
    let gw = d.gateway(&[]).await;
    let again = gw
        .post(t, "order:7", "alice", Some("refund-order-7"), refund)
        .await
        .unwrap();
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    gw.process.terminate().await;
    idem.terminate().await;
}

/// Two gateways write one entity at once: whatever order the writes
/// reach the log in, the entity ends as every `202`'d write applied in seq
/// order, and the seqs given are 1..=n, none left unfilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_entity_end_as_the_writes_in_seq_order() {
    let d = Deployment::start("gw-two", redis_url(), &[]).await;
    let (g1, g2) = (d.gateway(&[]).await, d.gateway(&[]).await);
    let t = d.topic.clone();
    let writes: Vec<_> = (0..60u64)
        .map(|i| {
            let (gw, t) = (if i % 2 == 0 { &g1 } else { &g2 }, t.clone());
            async move {
                let body = format!(
                    r#"{{"type":"deposit","data":{{"amount":"1.00","f{}":"{i}"}}}}"#,
                    i % 5
                );
                let reply = gw
                    .post_until_final(&t, "shared", &format!("w{i}"), &body)
                    .await;
                (accepted(&reply).seq, i)
            }
        })
        .collect();
    let mut given: Vec<(u64, u64)> = futures_util::future::join_all(writes).await;
    given.sort();
    let seqs: Vec<u64> = given.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<_>>(),
        "one seq each, none skipped"
    );
    // The writes in seq order: each field holds its last writer's value.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    for (_, i) in &given {
        expected.insert(format!("f{}", i % 5), i.to_string());
    }
    expected.insert("amount".into(), "1.00".into());
    // A read waits for its own seq only: wait for each of the 60.
    g1.assert_each_seq_counted(&t, "shared", 60).await;
    let state = g1.read_at(&t, "shared", 60).await;
    let got: BTreeMap<String, String> = serde_json::from_value(state["state"].clone()).unwrap();
    assert_eq!(got, expected);
    assert_eq!(state["counters"]["balance"], "60.00");
    g1.process.terminate().await;
    g2.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

/// A slow holder's seq is never closed by later ones. Its gateway dies
/// after binding seq 1 and before producing it; another gateway then binds
/// at most 32 seqs above it and answers `429` for the next, until the
/// sweeper has produced seq 1. Every seq counts its deposit. Before the
/// bound above the lowest unacknowledged seq (counting them alone), all 40
/// later writes were bound and acknowledged one by one, idem decided 33 of
/// them ahead of seq 1, the dense rule closed its gap, and its `202`'d
/// deposit was dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_holders_seq_is_never_closed_by_later_ones() {
    // A lease long enough that seqs 2..=33 are bound before the sweeper
    // takes seq 1 over, however loaded the machine.
    let d = Deployment::start("gw-slow", redis_url(), &[("IDEM__GATEWAY__LEASE", "8s")]).await;
    let t = d.topic.clone();
    d.post_to_a_gateway_that_dies("exit_before_produce", "acct:1", "first", &deposit("1.00"))
        .await;
    let gw = d
        .gateway(&[("IDEM__GATEWAY__RATE_PER_CALLER", "100000")])
        .await;
    let mut refused_at = Vec::new();
    for i in 2..=41u64 {
        let mut tries = 0;
        loop {
            let key = format!("w{i}");
            let reply = gw
                .post(&t, "acct:1", "alice", Some(&key), &deposit("1.00"))
                .await
                .expect("the gateway answers");
            if reply.status != 429 {
                assert_eq!(accepted(&reply).seq, i, "writes one after the other");
                break;
            }
            refused_at.push(i);
            tries += 1;
            assert!(tries < 30, "seq {i} refused for 30 s: {reply:?}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    assert!(
        refused_at.iter().all(|&i| i == 34) && !refused_at.is_empty(),
        "only seq 34, 33 above the unacknowledged seq 1, waits for it: {refused_at:?}"
    );
    let first = accepted(
        &gw.post_until_final(&t, "acct:1", "first", &deposit("1.00"))
            .await,
    );
    assert_eq!(first.seq, 1, "the key kept its seq");
    gw.assert_each_seq_counted(&t, "acct:1", 41).await;
    let state = gw.read_at(&t, "acct:1", 41).await;
    assert_eq!(
        state["counters"]["balance"], "41.00",
        "every deposit once: {state}"
    );
    // A gateway of the previous version stores without removing its seq's
    // u:<seq>: the next BIND drops one idem has decided, or it would hold
    // the entity back for good.
    let counters = KeyLayout::new(&t).entity("acct:1").gateway();
    let mut conn = redis_conn(&d.redis_url).await;
    let () = redis::cmd("HSET")
        .arg(&counters)
        .arg("u:5")
        .arg("left by an older gateway")
        .query_async(&mut conn)
        .await
        .unwrap();
    let more = gw
        .post(&t, "acct:1", "alice", Some("w42"), &deposit("1.00"))
        .await
        .unwrap();
    assert_eq!(accepted(&more).seq, 42);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&counters)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !fields.contains(&"u:5".to_string()),
        "a decided seq's u: field is dropped: {fields:?}"
    );
    gw.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

/// Read your writes: a write, then a read with its seq, sees the write, a
/// thousand times in a row, while the same idem applies a background
/// stream on another topic (2,000 records a second, in bursts of 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_write_sees_it_a_thousand_times_in_a_row() {
    use idem::tools::sample::{generate, SampleSpec};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut d = Deployment::start("gw-ryw", redis_url(), &[]).await;
    let t = d.topic.clone();
    let load = unique("gw-load");
    create_topic(&load, 2).await;
    // The same group's idem, now consuming the load topic too.
    d.idem.take().unwrap().terminate().await;
    let mut opts = IdemOpts::new(&t, &t, &t);
    opts.topics.push(load.clone());
    opts.redis_url = d.redis_url.clone();
    for (k, v) in &d.env {
        opts = opts.with(k, v);
    }
    let idem = Idem::spawn(&opts);
    let gw = d
        .gateway(&[("IDEM__GATEWAY__RATE_PER_CALLER", "100000")])
        .await;
    let records = generate(&SampleSpec {
        events: 40_000,
        entities: 2_000,
        duplicate_ratio: 0.2,
        out_of_order_ratio: 0.05,
        delete_ratio: 0.0,
        data_bytes: 32,
        seed: 7,
        prefix: load.clone(),
        zipf: None,
    });
    let done = AtomicBool::new(false);
    let background = async {
        let mut sent = 0;
        for chunk in records.chunks(500) {
            if done.load(Ordering::SeqCst) {
                break;
            }
            produce(&load, chunk).await;
            sent += chunk.len();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        sent
    };
    let writes = async {
        let mut waits = Vec::new();
        for i in 0..1000u64 {
            let body = format!(r#"{{"data":{{"n":"{i}"}}}}"#);
            let key = format!("r{i}");
            let started = std::time::Instant::now();
            let reply = gw
                .post(&t, &format!("user:{}", i % 7), "alice", Some(&key), &body)
                .await;
            let a = accepted(&reply.unwrap());
            let state = gw.read_at(&t, &a.entity, a.seq).await;
            waits.push(started.elapsed());
            assert_eq!(state["state"]["n"], i.to_string(), "write {i}: {state}");
        }
        done.store(true, Ordering::SeqCst);
        waits
    };
    let (sent, mut waits) = tokio::join!(background, writes);
    waits.sort();
    eprintln!(
        "read your writes under {sent} background records: write + read p50 {:?}, p99 {:?}",
        waits[waits.len() / 2],
        waits[waits.len() * 99 / 100]
    );
    assert!(sent >= 2_000, "the background stream ran alongside: {sent}");
    gw.process.terminate().await;
    idem.terminate().await;
}

/// The gateway dies after the broker acknowledged a write and before its
/// response was stored; the client retries after the consumer's dedupe
/// window has forgotten the id. The retry gets the same event's answer
/// (its id and seq), and the deposit counts once: the copy produced again
/// is caught by the dense rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_ack_answers_the_same_event_and_counts_it_once() {
    let d = Deployment::start(
        "gw-crash",
        redis_url(),
        &[
            ("IDEM__DEDUPE__WINDOW", "1s"),
            ("IDEM__GATEWAY__LEASE", "6s"),
        ],
    )
    .await;
    d.post_to_a_gateway_that_dies("exit_after_ack", "acct:9", "pay-1", &deposit("10.00"))
        .await;
    let t = d.topic.as_str();
    let gw = d.gateway(&[]).await;
    let first = gw.read_at(t, "acct:9", 1).await;
    assert_eq!(first["counters"]["balance"], "10.00");
    // The window forgets the id: a read of seq 1 no longer says how it was
    // decided (the dense mark still says that it was).
    wait_until("the dedupe window forgets gw-1", CATCH_UP, || async {
        gw.read_at(t, "acct:9", 1).await["decided"]["outcome"] == "decided"
    })
    .await;
    // Until the lease lapses the key is in flight (409); then the retry
    // (or the sweeper before it) produces the bound event again.
    let retry = std::sync::Mutex::new(None);
    wait_until("the retry is answered 202", CATCH_UP, || async {
        let reply = gw
            .post(t, "acct:9", "alice", Some("pay-1"), &deposit("10.00"))
            .await
            .unwrap();
        assert!(matches!(reply.status, 202 | 409), "{reply:?}");
        let done = reply.status == 202;
        *retry.lock().unwrap() = Some(reply);
        done
    })
    .await;
    let a = accepted(&retry.into_inner().unwrap().unwrap());
    assert_eq!(
        (a.seq, a.id.as_str()),
        (1, "gw-1"),
        "the same event's answer"
    );
    let more = accepted(
        &gw.post(t, "acct:9", "alice", Some("pay-2"), &deposit("1.00"))
            .await
            .unwrap(),
    );
    assert_eq!(more.seq, 2);
    let state = gw.read_at(t, "acct:9", 2).await;
    assert_eq!(
        state["counters"]["balance"], "11.00",
        "the deposit once: {state}"
    );
    let idem = d.idem.as_ref().unwrap();
    assert!(
        idem.outcome(t, idem::model::Outcome::Duplicate).await >= 1,
        "the copy reached idem and was dropped"
    );
    gw.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

/// Redis flushed under a running gateway: no write is given a seq already
/// in the log; writes wait (503) until idem has decided the topic again
/// under the new epoch, then continue after the log's last seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_pauses_writes_until_idem_has_caught_up() {
    if redis_mode(&redis_url()) == idem::config::RedisMode::Cluster {
        eprintln!("runs on a private standalone Redis: the standalone pass covers it");
        return;
    }
    let redis = PrivateRedis::start_with(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        "none",
        None,
    )
    .await
    .expect("private redis-server");
    let d = Deployment::start(
        "gw-flush",
        redis.url(),
        &[("IDEM__REDIS__PROGRESS_CHECK_INTERVAL", "1s")],
    )
    .await;
    let gw = d.gateway(&[]).await;
    let t = d.topic.as_str();
    for i in 1..=5u64 {
        let a = accepted(
            &gw.post(
                t,
                "acct:f",
                "alice",
                Some(&format!("f{i}")),
                &deposit("1.00"),
            )
            .await
            .unwrap(),
        );
        assert_eq!(a.seq, i);
    }
    gw.read_at(t, "acct:f", 5).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let mut refused = 0;
    let a = loop {
        let reply = gw
            .post(t, "acct:f", "alice", Some("after-flush"), &deposit("1.00"))
            .await
            .unwrap();
        match reply.status {
            202 => break accepted(&reply),
            503 => refused += 1,
            other => panic!("{other}: {}", String::from_utf8_lossy(&reply.body)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused > 0, "the first write after the flush waited");
    assert_eq!(a.seq, 6, "after the log's seqs, none of them again");
    let state = gw.read_at(t, "acct:f", 6).await;
    assert_eq!(state["counters"]["balance"], "6.00", "{state}");
    gw.process.terminate().await;
    d.idem.unwrap().terminate().await;
}

//! The gateway's routes: a write (`POST`), a read (`GET`, optionally
//! waiting for a seq), `/healthz` and `/readyz`. Each handler turns what
//! `binding` and `read` decide into an HTTP answer; the decisions are not here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::binding::{Bound, Kept, MAX_UNACKED};
use super::callers::Caller;
use super::fence::Gate;
use super::read::{decided, representation};
use super::request::{self, Accepted, Intent, Problem};
use super::service::Gateway;
use crate::metrics::gateway_answered;

pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.gateway.max_body_bytes;
    Router::new()
        .route("/v1/topics/{topic}/entities/{entity}/events", post(write))
        .route("/v1/topics/{topic}/entities/{entity}", get(read))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gateway)
}

fn problem(p: Problem) -> Response {
    let mut response = (
        StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        p.body(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(seconds) = p.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The caller of a request that may use `topic`, or the answer that says why not.
fn admit(gw: &Gateway, headers: &HeaderMap, topic: &str) -> Result<Caller, Problem> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(caller) = gw.callers.authenticate(authorization) else {
        return Err(Problem::new(
            401,
            "unauthenticated",
            "No known bearer token",
            "send Authorization: Bearer <token>, a token listed (hashed) in gateway.tokens_file"
                .into(),
        ));
    };
    if !gw.config.gateway.topics.iter().any(|t| t == topic) {
        return Err(Problem::new(
            404,
            "unknown-topic",
            "Not a gateway topic",
            format!("topic {topic} is not in gateway.topics"),
        ));
    }
    if !caller.may_use(topic) {
        return Err(Problem::new(
            403,
            "forbidden-topic",
            "Topic not allowed for this caller",
            format!("caller {} may not use topic {topic}", caller.name),
        ));
    }
    gw.callers
        .admit(&caller.name, Instant::now())
        .map_err(|wait| {
            Problem::new(
                429,
                "rate-limited",
                "Too many requests",
                format!(
                    "caller {} is over gateway.rate_per_caller on this instance",
                    caller.name
                ),
            )
            .retry_after(wait.as_secs_f64().ceil() as u64)
        })?;
    Ok(caller)
}

/// The Idempotency-Key, as a Structured Field string (`"..."`) or bare.
fn idempotency_key(gw: &Gateway, headers: &HeaderMap) -> Result<String, Problem> {
    let bad = |detail: &str| {
        Problem::new(
            400,
            "bad-idempotency-key",
            "Idempotency-Key missing or malformed",
            detail.to_string(),
        )
    };
    let Some(value) = headers.get("idempotency-key") else {
        if gw.config.gateway.require_key {
            return Err(bad("a write needs an Idempotency-Key header (a unique string per intended change, e.g. a UUID) so that its retries are recognised"));
        }
        return Ok(format!("unkeyed-{}", crate::store::progress::new_epoch()));
    };
    let text = value
        .to_str()
        .map_err(|_| bad("Idempotency-Key must be visible ASCII"))?;
    let key = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(bad(
            "Idempotency-Key must be 1-255 visible ASCII characters",
        ));
    }
    Ok(key.to_string())
}

async fn write(
    State(gw): State<Arc<Gateway>>,
    Path((topic, entity)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = match write_inner(&gw, &topic, &entity, &headers, body).await {
        Ok(response) => response,
        Err(p) => problem(p),
    };
    gateway_answered("write", answer.status().as_u16());
    answer
}

async fn write_inner(
    gw: &Gateway,
    topic: &str,
    entity: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let caller = admit(gw, headers, topic)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            413,
            "too-large",
            "Body too large",
            format!(
                "the body is over gateway.max_body_bytes = {}",
                gw.config.gateway.max_body_bytes
            ),
        ),
        _ => Problem::new(400, "bad-body", "The body could not be read", e.body_text()),
    })?;
    let key = idempotency_key(gw, headers)?;
    let intent = Intent::parse(&body)?;
    check_event(gw, topic, entity, &intent)?;
    let Gate::Open { epoch } = gw.fence.gate() else {
        return Err(unavailable(gw));
    };
    let canonical = intent.canonical();
    let fingerprint =
        request::fingerprint("POST", &request::write_route(topic, entity), &canonical);
    let key_hash = request::key_hash(&caller.name, &key);
    let binding = gw
        .bindings
        .layout()
        .entity(entity)
        .gateway_binding(&key_hash);
    let cfg = &gw.config.gateway;
    let bound = gw
        .bindings
        .bind(
            &epoch,
            entity,
            &key_hash,
            &fingerprint,
            topic,
            &canonical,
            cfg.key_window,
            cfg.lease,
        )
        .await
        .map_err(|e| store_failed(gw, &epoch, e))?;
    let (seq, token, topic, intent) = match bound {
        Bound::Stored { seq, topic, partition, offset, waited } => {
            record_wait(waited);
            let id = request::event_id(seq);
            let entity = entity.to_string();
            return Ok(replayed(Accepted { id, entity, seq, topic, partition, offset }.to_bytes()));
        }
        Bound::Conflict { seq } => return Err(Problem::new(422, "key-reused", "Idempotency-Key reused with another request", format!("key {key:?} is bound to another request (seq {seq} of entity {entity}): a new change needs a new key"))),
        Bound::Busy(left) => return Err(in_flight(&key, left)),
        Bound::Full { unacked, lowest } => return Err(entity_busy(entity, unacked, lowest)),
        Bound::New { seq, token } => (seq, token, topic.to_string(), intent),
        Bound::Retake { seq, token, topic, body, waited } => {
            record_wait(waited);
            let Some(intent) = Intent::from_canonical(&body) else {
                return Err(Problem::new(500, "bad-binding", "A stored binding does not parse", format!("key {key:?}")));
            };
            (seq, token, topic, intent)
        }
    };
    match gw.finish(&topic, entity, &binding, (seq, token), &intent).await {
        Ok((Kept::Stored | Kept::Gone, response)) => Ok(json(StatusCode::ACCEPTED, response)),
        // Another holder took the key over meanwhile: its stored answer counts.
        Ok((Kept::Fenced | Kept::Done | Kept::Released, _)) => Err(in_flight(&key, cfg.lease)),
        Err(e) => Err(Problem::new(503, "unfinished", "The write is not finished", format!("seq {seq} of {entity}: {e}; it stays bound to this key, and the next retry with it (or the sweeper) finishes it")).retry_after(1)),
    }
}

/// The consumer's own decoder and effects on the event this write becomes:
/// a write that idem would dead-letter is refused before it is bound.
fn check_event(gw: &Gateway, topic: &str, entity: &str, intent: &Intent) -> Result<(), Problem> {
    let record = request::event_record(&gw.config.event.fields, entity, 1, intent);
    let invalid = |e: crate::event::Invalid| {
        Problem::new(
            422,
            "invalid-event",
            "The write is not a valid event",
            format!("{} ({})", e, e.code().as_str()),
        )
    };
    let event =
        crate::event::decode_record(Some(&record), &[], &gw.config.event).map_err(invalid)?;
    gw.policies.get(topic).plan(&event).map_err(invalid)?;
    Ok(())
}

/// A key answered `409` earlier reached its final answer after `waited`.
fn record_wait(waited: Option<Duration>) {
    if let Some(waited) = waited {
        metrics::histogram!(crate::metrics::GATEWAY_CONFLICT_WAIT_SECONDS)
            .record(waited.as_secs_f64());
    }
}

fn replayed(response: Vec<u8>) -> Response {
    metrics::counter!(crate::metrics::GATEWAY_REPLAYS_TOTAL).increment(1);
    let mut answer = json(StatusCode::ACCEPTED, response);
    answer
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    answer
}

/// 429: too many of `entity`'s writes unacknowledged, or the next seq too
/// far above the lowest of them (`lowest`).
fn entity_busy(entity: &str, unacked: u64, lowest: Option<u64>) -> Problem {
    let detail = match lowest {
        None => {
            format!("entity {entity} has {unacked} writes the brokers have not acknowledged yet")
        }
        Some(lowest) => format!(
            "entity {entity}'s write at seq {lowest} is not acknowledged by the brokers yet, \
             and the next seq may be at most {MAX_UNACKED} above it"
        ),
    };
    Problem::new(
        429,
        "entity-busy",
        "Too many writes in flight for this entity",
        detail,
    )
    .retry_after(1)
}

fn in_flight(key: &str, left: Duration) -> Problem {
    Problem::new(
        409,
        "in-flight",
        "A request with this key is in flight",
        format!("key {key:?} is being processed; retry after it finished"),
    )
    .retry_after(left.as_secs_f64().ceil() as u64)
}

fn unavailable(gw: &Gateway) -> Problem {
    let reason = match gw.fence.gate() {
        Gate::Closed { reason } => reason,
        Gate::Open { .. } => "the epoch just changed".into(),
    };
    Problem::new(503, "not-ready", "Writes are paused", reason).retry_after(1)
}

/// A Redis error: an epoch refusal closes the fence; any other is a 503.
fn store_failed(gw: &Gateway, epoch: &str, e: crate::store::StoreError) -> Problem {
    match crate::store::progress::epoch_refusal(e, epoch) {
        crate::store::StoreError::EpochChanged { found, .. } => {
            gw.fence.lost(epoch, &found);
            unavailable(gw)
        }
        other => redis_unavailable(other),
    }
}

fn redis_unavailable(e: crate::store::StoreError) -> Problem {
    Problem::new(
        503,
        "redis-unavailable",
        "Redis did not answer",
        e.to_string(),
    )
    .retry_after(1)
}

/// A read's query: `min_seq=N` and `timeout=2s`.
#[derive(Debug, Default)]
struct ReadQuery {
    min_seq: Option<u64>,
    /// e.g. `2s`, `500ms`.
    timeout: Option<String>,
}

impl ReadQuery {
    /// Reads `min_seq` and `timeout`; another parameter, or a value that
    /// does not parse, is the client's mistake, named.
    fn parse(query: Option<&str>) -> Result<ReadQuery, Problem> {
        let mut read = ReadQuery::default();
        let bad =
            |detail: String| Problem::new(400, "bad-query", "The query is not a read", detail);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("min_seq", n)) => {
                    read.min_seq =
                        Some(n.parse().map_err(|_| {
                            bad(format!("min_seq={n:?} is not a seq (a whole number)"))
                        })?)
                }
                Some(("timeout", t)) => read.timeout = Some(t.to_string()),
                _ => {
                    return Err(bad(format!(
                        "{pair:?}: a read takes min_seq=N and timeout=2s"
                    )))
                }
            }
        }
        Ok(read)
    }
}

async fn read(
    State(gw): State<Arc<Gateway>>,
    Path((topic, entity)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let read = ReadQuery::parse(query.as_deref());
    let answer = match async { read_inner(&gw, &topic, &entity, &read?, &headers).await }.await {
        Ok(response) => response,
        Err(p) => problem(p),
    };
    gateway_answered("read", answer.status().as_u16());
    answer
}

async fn read_inner(
    gw: &Gateway,
    topic: &str,
    entity: &str,
    query: &ReadQuery,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    admit(gw, headers, topic)?;
    let most = gw.config.gateway.max_read_wait;
    let wait = match &query.timeout {
        None => Duration::from_secs(2).min(most),
        Some(t) => crate::config::parse_duration(t)
            .ok_or_else(|| {
                Problem::new(
                    400,
                    "bad-timeout",
                    "timeout is not a duration",
                    format!("timeout={t:?}: write it like 2s or 500ms"),
                )
            })?
            .min(most),
    };
    let window = gw.policies.get(topic).window;
    let id = query.min_seq.map(request::event_id);
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let snapshot = gw
            .bindings
            .read(entity, id.as_deref(), window, now_ms)
            .await
            .map_err(redis_unavailable)?;
        let asked = match query.min_seq {
            None => None,
            Some(n) => match decided(&snapshot, n) {
                Some(outcome) => Some((n, outcome)),
                None if started.elapsed() < wait => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                    continue;
                }
                None => return Err(Problem::new(504, "not-decided", "The seq is not decided yet", format!("idem has not decided seq {n} of {entity} within {wait:?}: read again (idem may be behind, or the write not acknowledged yet)")).retry_after(1)),
            },
        };
        if query.min_seq.is_some() {
            metrics::histogram!(crate::metrics::GATEWAY_READ_WAIT_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
        let (body, tag) = representation(entity, &snapshot, asked);
        let matches = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
        let mut answer = if matches {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            json(StatusCode::OK, body.into_bytes())
        };
        answer.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&tag).expect("hex in quotes"),
        );
        return Ok(answer);
    }
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.fence.gate() {
        Gate::Open { .. } => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Gate::Closed { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

//! What a request is, pure: the body a `POST` carries and its canonical
//! form, the request's fingerprint, a caller's key as stored, the event
//! record a bound request becomes, and the answers (`202` and
//! problem+json, RFC 9457).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::event::FieldMap;

/// The route of a write, as the fingerprint names it.
pub fn write_route(topic: &str, entity: &str) -> String {
    format!("/v1/topics/{topic}/entities/{entity}/events")
}

/// A write's body: `{"type": "...", "data": {...}}`, both optional
/// (no type: the topic's catch-all rule; no data: no fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub kind: Option<String>,
    pub data: Map<String, Value>,
}

impl Intent {
    /// The body, read strictly: a JSON object with at most `type` (a
    /// string) and `data` (an object); anything else is the client's
    /// mistake, named.
    pub fn parse(body: &[u8]) -> Result<Intent, Problem> {
        let bad = |detail: String| Problem::new(400, "bad-body", "The body is not a write", detail);
        let value: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(bad(
                "the body must be a JSON object {\"type\": ..., \"data\": {...}}".into(),
            ));
        };
        let kind = match object.remove("type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(_) => return Err(bad("\"type\" must be a non-empty string".into())),
        };
        let data = match object.remove("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data,
            Some(_) => return Err(bad("\"data\" must be a JSON object".into())),
        };
        if let Some(other) = object.keys().next() {
            return Err(bad(format!(
                "unknown member {other:?}: a write has only \"type\" and \"data\""
            )));
        }
        Ok(Intent { kind, data })
    }

    /// The canonical body: keys sorted, no whitespace (serde_json's map is
    /// ordered). Two bodies that differ in spacing or key order are one request.
    pub fn canonical(&self) -> String {
        let mut object = Map::new();
        object.insert("data".into(), Value::Object(self.data.clone()));
        if let Some(kind) = &self.kind {
            object.insert("type".into(), Value::String(kind.clone()));
        }
        Value::Object(object).to_string()
    }

    /// Reads a canonical body back (a binding's, for the sweeper).
    pub fn from_canonical(body: &str) -> Option<Intent> {
        Intent::parse(body.as_bytes()).ok()
    }
}

/// SHA-256 of `parts`, each followed by a zero byte, as hex (first `bytes` bytes).
fn sha256_hex(parts: &[&str], bytes: usize) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    let digest = context.finish();
    digest.as_ref()[..bytes]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The request's fingerprint: method, route and canonical body. The same
/// key with another fingerprint is another request (`422`).
pub fn fingerprint(method: &str, route: &str, canonical_body: &str) -> String {
    sha256_hex(&[method, route, canonical_body], 16)
}

/// A caller's key as stored: a hash of the caller and the key, so one
/// caller's key is never another's, and keys of any length or alphabet
/// make keys of one length.
pub fn key_hash(caller: &str, key: &str) -> String {
    sha256_hex(&[caller, key], 16)
}

/// SHA-256 of a bearer token, as the tokens file holds it.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of the event bound at `seq`: the gateway is its entities' only
/// writer, so a seq names one event, and a key bound again (after its
/// window) gets a new seq and so a new id, never a known id at a new seq.
pub fn event_id(seq: u64) -> String {
    format!("gw-{seq}")
}

/// The record a bound request becomes, in idem's envelope under the
/// configured field names, canonical (sorted keys, no whitespace): the same
/// bytes each time it is produced, by any instance.
pub fn event_record(fields: &FieldMap, entity: &str, seq: u64, intent: &Intent) -> Vec<u8> {
    let mut root = Value::Object(Map::new());
    set_at(&mut root, &fields.id, Value::String(event_id(seq)));
    set_at(&mut root, &fields.entity, Value::String(entity.to_string()));
    set_at(&mut root, &fields.seq, Value::from(seq));
    if let Some(kind) = &intent.kind {
        set_at(&mut root, &fields.kind, Value::String(kind.clone()));
    }
    set_at(&mut root, &fields.data, Value::Object(intent.data.clone()));
    root.to_string().into_bytes()
}

/// Sets `value` at JSON pointer `pointer`, making the objects on the way.
fn set_at(root: &mut Value, pointer: &str, value: Value) {
    let mut at = root;
    let parts: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    let Some((last, path)) = parts.split_last() else {
        return;
    };
    for part in path {
        if !at.get(part).is_some_and(Value::is_object) {
            at[part.as_str()] = Value::Object(Map::new());
        }
        at = &mut at[part.as_str()];
    }
    at[last.as_str()] = value;
}

/// The `202` a produced write answers (and the bytes stored with its key).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub entity: String,
    pub seq: u64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Accepted {
    /// The `202`'s body. The same fields always make the same bytes, so a
    /// replay rebuilt from the stored binding is the first answer, byte for byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }
}

/// An error answer, as problem+json (RFC 9457).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    /// The last part of its `type` URI.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: u16, kind: &'static str, title: &'static str, detail: String) -> Problem {
        Problem {
            status,
            kind,
            title,
            detail,
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The problem+json body.
    pub fn body(&self) -> String {
        serde_json::json!({
            "type": format!("urn:idem:problem:{}", self.kind),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_read_strictly_and_canonically() {
        let a = Intent::parse(br#"{"type":"deposit","data":{"b":1,"a":"x"}}"#).unwrap();
        let b = Intent::parse(br#"{ "data": {"a":"x", "b":1}, "type": "deposit" }"#).unwrap();
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(
            a.canonical(),
            r#"{"data":{"a":"x","b":1},"type":"deposit"}"#
        );
        assert_eq!(Intent::from_canonical(&a.canonical()), Some(a));
        for (body, says) in [
            (&b"[1]"[..], "JSON object"),
            (b"{", "not JSON"),
            (br#"{"type":3}"#, "\"type\""),
            (br#"{"data":[1]}"#, "\"data\""),
            (br#"{"data":{},"seq":4}"#, "unknown member \"seq\""),
        ] {
            let p = Intent::parse(body).unwrap_err();
            assert_eq!(p.status, 400);
            assert!(p.detail.contains(says), "{}: {}", says, p.detail);
        }
    }

    #[test]
    fn fingerprints_and_key_hashes_separate_what_they_name() {
        let route = write_route("t", "e");
        let f = fingerprint("POST", &route, "{}");
        assert_eq!(f.len(), 32);
        assert_ne!(f, fingerprint("POST", &write_route("u", "e"), "{}"));
        assert_ne!(f, fingerprint("POST", &route, r#"{"data":{}}"#));
        assert_ne!(key_hash("alice", "k1"), key_hash("bob", "k1"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        assert_eq!(
            token_hash("secret"),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
    }

    #[test]
    fn the_record_decodes_as_the_event_it_was_bound_as() {
        let intent = Intent::parse(br#"{"type":"deposit","data":{"amount":"2.50"}}"#).unwrap();
        let fields = FieldMap::default();
        let record = event_record(&fields, "acct:1", 7, &intent);
        assert_eq!(
            String::from_utf8(record.clone()).unwrap(),
            r#"{"data":{"amount":"2.50"},"entity":"acct:1","id":"gw-7","seq":7,"type":"deposit"}"#
        );
        let event = crate::event::decode(Some(&record), &fields, 1 << 20).unwrap();
        assert_eq!((event.id.as_str(), event.seq), ("gw-7", 7));
        assert_eq!(event.kind.as_deref(), Some("deposit"));

        let nested = FieldMap {
            id: "/meta/id".into(),
            ..FieldMap::default()
        };
        let record = event_record(&nested, "acct:1", 8, &intent);
        let event = crate::event::decode(Some(&record), &nested, 1 << 20).unwrap();
        assert_eq!(event.id, "gw-8");
    }

    #[test]
    fn a_problem_is_problem_json_with_its_status() {
        let p = Problem::new(422, "key-reused", "Key reused", "k".into()).retry_after(0);
        let v: Value = serde_json::from_str(&p.body()).unwrap();
        assert_eq!(v["status"], 422);
        assert_eq!(v["type"], "urn:idem:problem:key-reused");
        assert_eq!(p.retry_after, Some(1));
    }
}

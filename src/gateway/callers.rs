//! Who may call: bearer tokens from `gateway.tokens_file` (stored as
//! SHA-256, never in clear), each naming its caller and the topics it may
//! write and read; and each caller's rate, per gateway instance.
//!
//! The file has one caller a line, `<caller> <sha256 hex of its token>
//! <topic>[,<topic>…]` (`*`: every gateway topic); `#` starts a comment.
//! It is read again when it changes (checked every 2 s) and on SIGHUP; a
//! file that does not parse keeps the callers of the last one that did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::request::token_hash;

/// One caller, as the tokens file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// The topics it may write and read; `None`: every gateway topic.
    topics: Option<Vec<String>>,
}

impl Caller {
    pub fn may_use(&self, topic: &str) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|topics| topics.iter().any(|t| t == topic))
    }
}

/// The tokens file, parsed: token hash → caller. Every mistake is named
/// with its line.
pub fn parse_tokens(text: &str) -> Result<HashMap<String, Caller>, String> {
    let mut callers = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, hash, topics] = parts[..] else {
            return Err(format!(
                "line {}: expected `<caller> <sha256 hex of the token> <topics>`, found {} words",
                n + 1,
                parts.len()
            ));
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "line {}: {hash:?} is not a SHA-256 in hex (64 digits): store `printf %s TOKEN | sha256sum`, not the token",
                n + 1
            ));
        }
        let topics = (topics != "*").then(|| topics.split(',').map(String::from).collect());
        let caller = Caller {
            name: name.to_string(),
            topics,
        };
        if callers.insert(hash.to_ascii_lowercase(), caller).is_some() {
            return Err(format!(
                "line {}: this token hash is on an earlier line too",
                n + 1
            ));
        }
    }
    Ok(callers)
}

/// The callers by token hash, and the file's modification time when read.
type Known = (HashMap<String, Caller>, Option<SystemTime>);

/// The callers of the tokens file, kept current.
#[derive(Clone)]
pub struct Callers {
    path: Arc<str>,
    known: Arc<RwLock<Known>>,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
    rate: f64,
}

impl Callers {
    /// Reads `path` (refused when it does not parse: the gateway does not
    /// start without callers it can name).
    pub fn load(path: &str, rate_per_second: usize) -> Result<Callers, String> {
        let callers = Callers {
            path: path.into(),
            known: Default::default(),
            buckets: Default::default(),
            rate: rate_per_second as f64,
        };
        callers.reload()?;
        Ok(callers)
    }

    /// Reads the file again; on a mistake the callers stay as they were.
    pub fn reload(&self) -> Result<usize, String> {
        let text = std::fs::read_to_string(&*self.path)
            .map_err(|e| format!("gateway.tokens_file {}: {e}", self.path))?;
        let modified = std::fs::metadata(&*self.path)
            .and_then(|m| m.modified())
            .ok();
        let parsed =
            parse_tokens(&text).map_err(|e| format!("gateway.tokens_file {}: {e}", self.path))?;
        let count = parsed.len();
        *self.known.write().expect("not poisoned") = (parsed, modified);
        Ok(count)
    }

    /// Reloads when the file's modification time changed, or on SIGHUP:
    /// runs until the process ends.
    pub async fn watch(self) {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => false,
                _ = hup => true,
            };
            let modified = std::fs::metadata(&*self.path)
                .and_then(|m| m.modified())
                .ok();
            let seen = self.known.read().expect("not poisoned").1;
            if forced || modified != seen {
                match self.reload() {
                    Ok(n) => tracing::info!(callers = n, "gateway tokens reloaded"),
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway tokens not reloaded: the last good file stays")
                    }
                }
            }
        }
    }

    /// The caller whose token `authorization` (the header's value) bears.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Caller> {
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        let known = self.known.read().expect("not poisoned");
        known.0.get(&token_hash(token)).cloned()
    }

    /// Whether `caller` may make one more request now (a token bucket of
    /// `gateway.rate_per_caller` a second, as deep as one second's worth);
    /// else how long until it may.
    pub fn admit(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("not poisoned");
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            tokens: self.rate,
            at: now,
        });
        bucket.take(self.rate, now)
    }
}

/// A token bucket: `tokens` left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, now: Instant) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

    #[test]
    fn the_tokens_file_names_callers_and_their_topics() {
        let text = format!(
            "# callers\nalice {H} payments,orders\n\nbob {} *  # all\n",
            "a".repeat(64)
        );
        let callers = parse_tokens(&text).unwrap();
        let alice = &callers[H];
        assert_eq!(alice.name, "alice");
        assert!(alice.may_use("orders") && !alice.may_use("other"));
        assert!(callers[&"a".repeat(64)].may_use("anything"));
    }

    #[test]
    fn a_bad_tokens_file_says_which_line_and_why() {
        assert!(parse_tokens("alice secret *")
            .unwrap_err()
            .contains("line 1: \"secret\" is not a SHA-256"));
        assert!(parse_tokens(&format!("\nalice {H}"))
            .unwrap_err()
            .contains("line 2: expected"));
        let twice = format!("a {H} *\nb {H} *");
        assert!(parse_tokens(&twice).unwrap_err().contains("line 2"));
    }

    #[test]
    fn a_caller_is_found_by_its_token_and_held_to_its_rate() {
        let dir = std::env::temp_dir().join(format!("idem-tokens-{}", std::process::id()));
        std::fs::write(&dir, format!("alice {H} *\n")).unwrap();
        let callers = Callers::load(dir.to_str().unwrap(), 2).unwrap();
        assert_eq!(
            callers.authenticate(Some("Bearer secret")).unwrap().name,
            "alice"
        );
        assert!(callers.authenticate(Some("Bearer other")).is_none());
        assert!(callers.authenticate(Some("secret")).is_none());
        let t = Instant::now();
        assert!(callers.admit("alice", t).is_ok());
        assert!(callers.admit("alice", t).is_ok());
        let wait = callers.admit("alice", t).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        assert!(
            callers.admit("bob", t).is_ok(),
            "each caller has its own bucket"
        );
        assert!(callers
            .admit("alice", t + Duration::from_millis(500))
            .is_ok());
        std::fs::remove_file(dir).unwrap();
    }
}

//! Redis's own record of how far its state goes: the epoch marker that every
//! guard call checks, and per partition the next offset whose effects are
//! all in Redis (the sink keeps its own progress, as Kafka Connect sinks do).
//!
//! Guarantee: a progress record is written only after every effect it covers
//! was answered by Redis, on the same server, so any state Redis comes back
//! with (a restart, a restored snapshot, a promoted replica: each a prefix of
//! what was written) holds every effect its records cover. Records only move
//! forward. A record is written only where the epoch marker is the one idem
//! knows, so nothing is recorded into a Redis that lost its state.
//!
//! Layout (docs/redis-layout.md): the marker is one key on a standalone
//! server and one key per slot on a cluster (a script may only read keys of
//! the slot it runs in); the records of a cluster live on every master, in
//! the slot that is its lowest, so a master that lost its state shows it in
//! its own records while an idle master still has fresh ones.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use redis::Value;

use super::script::{Constant, Script};
use super::{
    decided_field, progress_field, progress_incarnation_field, progress_owner_field, KeyLayout,
    NodeAddr, RedisConn, StoreError,
};
use crate::consumed::{DecidedRanges, TopicId};
use crate::offsets::TopicPartition;

/// Checks the marker, then that no record is below what the caller last
/// wrote (ARGV[2] quintuples: field, incarnation field, incarnation short
/// id, new offset, expected minimum or -1; the incarnation's two "" where
/// its id is unknown), then raises each record to its new offset (never
/// lowers it), and adds each claim (the triples after them: field, start,
/// end) to the decided ranges (`crate::consumed::DecidedRanges::claim`, the
/// same merge and cap). A refusal writes nothing.
///
/// A record is read as [`ProgressStore::read`] reads it: the incarnation's
/// own field; else the plain `<topic>:<partition>` field (versions before
/// 0.3 write only that one), unless its owner field names another
/// incarnation (the topic was created again since).
static RECORD: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    let max = i64::try_from(crate::consumed::MAX_RANGES).expect("a small number");
    Script::of(
        None,
        &[("MAX_RANGES".into(), Constant::Int(max))],
        "src/store/record.lua",
        include_str!("record.lua"),
    )
});

/// A partition's record as [`RECORD`] reads it, and whether it is the
/// incarnation's own:
///
/// | own field | owner field        | record           |
/// |-----------|--------------------|------------------|
/// | present   | any                | own (its own)    |
/// | absent    | another incarnation| none             |
/// | absent    | this one, or absent| the plain field  |
fn record_of(
    plain: Option<&str>,
    owner: Option<&str>,
    own: Option<&str>,
    incarnation: &Option<(String, String)>,
) -> Result<(Option<i64>, bool), StoreError> {
    let number = |text: &str| {
        text.parse::<i64>()
            .map_err(|_| StoreError::Protocol(format!("progress record {text:?}")))
    };
    if let Some(own) = own {
        return Ok((Some(number(own)?), true));
    }
    if let (Some(owner), Some((_, id))) = (owner, incarnation) {
        if owner != id {
            return Ok((None, false));
        }
    }
    Ok((plain.map(number).transpose()?, false))
}

/// Sets the marker to ARGV[2] if it still is ARGV[1] ('' for absent); answers the marker.
const RENEW: &str = include_str!("renew.lua");

/// That every record of a partition (of one topic incarnation) in
/// `[start, end)` was decided: added to its decided ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub tp: TopicPartition,
    pub topic_id: TopicId,
    pub start: i64,
    pub end: i64,
}

/// What one server (or one cluster master) says about one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRecord {
    /// The master, by address (`None` on a standalone server).
    pub node: Option<NodeAddr>,
    /// The epoch marker where the records live (`None`: absent).
    pub marker: Option<String>,
    /// The next offset whose effects are all on this master (`None`: no record).
    pub next: Option<i64>,
    /// Whether this master holds progress records at all (of any partition).
    pub has_records: bool,
    /// Whether `next` is the record of the topic's current incarnation
    /// itself (written by this version since the topic's id was known),
    /// rather than the plain record older versions write.
    pub of_incarnation: bool,
}

/// Each server that holds data with the slot of its records.
type Anchors = Vec<(Option<NodeAddr>, Option<u16>)>;

/// How long a cluster's anchors are used before the slot map is read again.
const ANCHORS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// The markers and records of a Redis, as `idem check` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// Each marker value and how many markers (slots) hold it.
    pub epochs: BTreeMap<String, usize>,
    /// Markers absent.
    pub missing: usize,
    /// Per server, how many partitions it holds a progress record of.
    pub records: Vec<(Option<NodeAddr>, usize)>,
}

/// Reads and writes the marker and the progress records.
#[derive(Clone)]
pub struct ProgressStore {
    conn: RedisConn,
    layout: KeyLayout,
    /// Read again when old, dropped after any failure (a failover moves them).
    anchors: Option<(Anchors, std::time::Instant)>,
    /// Each topic's current incarnation, once the pipeline learned it (shared
    /// by the clones: the assignment learns, the guard stage records).
    incarnations: std::sync::Arc<std::sync::Mutex<BTreeMap<String, TopicId>>>,
}

/// How often, and how far apart, markers partly absent are read again
/// before they count as a loss (another instance setting them finishes
/// within milliseconds).
const SETTLE_READS: usize = 5;
const SETTLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A fresh epoch: 16 hex digits, random.
pub fn new_epoch() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Turns the scripts' `IDEMEPOCH <found>` and `IDEMROLLBACK <what>`
/// refusals into their own errors.
pub fn epoch_refusal(e: StoreError, expected: &str) -> StoreError {
    match &e {
        StoreError::Redis(r) if r.code() == Some("IDEMEPOCH") => StoreError::EpochChanged {
            expected: expected.to_string(),
            found: r.detail().unwrap_or("missing").to_string(),
        },
        StoreError::Redis(r) if r.code() == Some("IDEMROLLBACK") => {
            StoreError::RolledBack(r.detail().unwrap_or_default().to_string())
        }
        _ => e,
    }
}

impl ProgressStore {
    pub fn new(conn: RedisConn, layout: KeyLayout) -> Self {
        ProgressStore {
            conn,
            layout,
            anchors: None,
            incarnations: Default::default(),
        }
    }

    /// The topics' current incarnations (from the brokers, at an
    /// assignment): from now on their records are kept per incarnation, so
    /// a topic created again starts a record of its own instead of being
    /// measured against the old one's offsets.
    pub fn learn_incarnations(&self, ids: &BTreeMap<String, TopicId>) {
        let mut known = self.incarnations.lock().expect("not poisoned");
        known.extend(ids.iter().map(|(t, id)| (t.clone(), id.clone())));
    }

    /// The incarnation record field and short id of `tp`, if its id is known.
    fn incarnation(&self, tp: &TopicPartition) -> Option<(String, String)> {
        let known = self.incarnations.lock().expect("not poisoned");
        known
            .get(&tp.topic)
            .map(|id| (progress_incarnation_field(tp, id), id.short().to_string()))
    }

    /// The key prefix the markers and records live under.
    pub fn prefix(&self) -> &str {
        self.layout.prefix()
    }

    /// Whether any entity has bookkeeping under the prefix (a SCAN that
    /// stops at the first): Redis holds idem's data, records or not.
    pub async fn holds_entities(&mut self) -> Result<bool, StoreError> {
        let (pattern, _) = self.layout.meta_pattern();
        self.conn.any_key(&pattern).await
    }

    pub fn set_connection(&mut self, conn: RedisConn) {
        self.conn = conn;
        self.anchors = None;
    }

    /// Each server that holds data with the slot of its records (`None`s on
    /// a standalone server); a cluster's are read at most every few seconds.
    async fn anchors(&mut self) -> Result<Anchors, StoreError> {
        if let Some((anchors, read)) = &self.anchors {
            if read.elapsed() < ANCHORS_MAX_AGE {
                return Ok(anchors.clone());
            }
        }
        let anchors: Anchors = match self.conn.slot_map().await? {
            None => vec![(None, None)],
            Some(map) => map
                .anchors()
                .into_iter()
                .map(|(n, s)| (Some(n), Some(s)))
                .collect(),
        };
        self.anchors = Some((anchors.clone(), std::time::Instant::now()));
        Ok(anchors)
    }

    /// Every marker key, grouped by the server that holds it.
    async fn marker_groups(&mut self) -> Result<Vec<(Option<NodeAddr>, Vec<String>)>, StoreError> {
        let Some(map) = self.conn.slot_map().await? else {
            return Ok(vec![(None, vec![self.layout.epoch_key(None)])]);
        };
        let mut groups: BTreeMap<NodeAddr, Vec<String>> = BTreeMap::new();
        for slot in 0..16384u16 {
            let node = map.owner(slot).cloned().ok_or_else(|| {
                StoreError::Protocol(format!("slot {slot} has no master in CLUSTER SLOTS"))
            })?;
            groups
                .entry(node)
                .or_default()
                .push(self.layout.epoch_key(Some(slot)));
        }
        Ok(groups.into_iter().map(|(n, k)| (Some(n), k)).collect())
    }

    /// The epoch every marker holds, after making them agree: markers that
    /// are absent (a server lost its state, or idem never ran here) renew
    /// the epoch for all, so every instance notices at its next write; a
    /// disagreement (another instance renewing) settles on the authority's.
    pub async fn establish_epoch(&mut self) -> Result<String, StoreError> {
        self.settle_epoch(None).await
    }

    /// The epoch every marker holds, read only (never written): `None`
    /// while any marker is absent or two disagree (no `idem run` set them
    /// yet, one is setting them, or a server lost its state). For a
    /// process that writes under idem's epoch without owning it: `idem gateway`.
    pub async fn agreed_epoch(&mut self) -> Result<Option<String>, StoreError> {
        let groups = self.marker_groups().await?;
        let markers = self.read_markers(&groups).await?;
        let first = markers.first().cloned().flatten();
        Ok(first.filter(|f| markers.iter().all(|m| m.as_ref() == Some(f))))
    }

    /// Replaces the epoch `known` by a new one on every marker (or adopts
    /// the one another instance already put there): every instance's next
    /// write is refused, and each reads Redis's records again.
    pub async fn renew_epoch(&mut self, known: &str) -> Result<String, StoreError> {
        self.settle_epoch(Some(known)).await
    }

    async fn settle_epoch(&mut self, renew_from: Option<&str>) -> Result<String, StoreError> {
        let groups = self.marker_groups().await?;
        let mut markers = self.read_markers(&groups).await?;
        // On a cluster, markers absent beside a present one are either a
        // server that lost its state or another instance between its SET
        // of the first markers and of the last: a few reads apart tell the
        // two, so an instance that starts beside another adopts its epoch
        // instead of renewing it (which would make the other re-read).
        for _ in 0..SETTLE_READS {
            let some = markers.iter().any(Option::is_some);
            if renew_from.is_some() || !some || markers.iter().all(Option::is_some) {
                break;
            }
            tokio::time::sleep(SETTLE_PAUSE).await;
            markers = self.read_markers(&groups).await?;
        }
        if let Some(Some(first)) = markers.first() {
            let agree = markers.iter().all(|m| m.as_deref() == Some(first));
            if agree && renew_from != Some(first.as_str()) {
                return Ok(first.clone());
            }
        }
        let authority = self.layout.epoch_key(self.conn.is_cluster().then_some(0));
        let seen: Option<String> =
            redis::from_redis_value(&self.query(redis::cmd("GET").arg(&authority)).await?)?;
        let renew = renew_from.is_some_and(|k| seen.as_deref() == Some(k));
        // A marker absent when read renews the epoch only if the authority
        // still holds what it held then: if it changed since, another
        // instance just set or renewed the epoch, and this one adopts it
        // (two instances starting on a new prefix agree at once, and
        // neither takes the other's epoch for a loss). On a cluster a read
        // between another instance's renewal of the authority and its SET
        // of the other markers sees absent markers beside a fresh
        // authority, as after a loss of one server's state: the reads
        // again above let that SET finish first. Only an instance stalled
        // for longer mid-SET still makes this one renew once more (a
        // needless re-read, never a missed loss).
        let authority_at_read = groups
            .iter()
            .flat_map(|(_, keys)| keys)
            .position(|k| *k == authority)
            .map_or_else(|| seen.clone(), |i| markers[i].clone());
        let epoch: String = if renew || markers.iter().any(Option::is_none) {
            let expected = if renew { seen } else { authority_at_read };
            let mut renew = redis::cmd("EVAL");
            renew
                .arg(RENEW)
                .arg(1)
                .arg(&authority)
                .arg(expected.unwrap_or_default())
                .arg(new_epoch());
            redis::from_redis_value(&self.query(&renew).await?)?
        } else {
            seen.unwrap_or_else(new_epoch)
        };
        for (node, keys) in &groups {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("SET").arg(k).arg(&epoch).ignore();
            }
            self.conn.pipeline_on(node, &pipe).await?;
        }
        Ok(epoch)
    }

    /// Every marker's value, in the order of `groups`.
    async fn read_markers(
        &mut self,
        groups: &[(Option<NodeAddr>, Vec<String>)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut markers = Vec::new();
        for (node, keys) in groups {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("GET").arg(k);
            }
            for v in self.conn.pipeline_on(node, &pipe).await? {
                markers.push(redis::from_redis_value::<Option<String>>(&v)?);
            }
        }
        Ok(markers)
    }

    /// What `idem check` reports, read only: the markers' values and how
    /// many progress records each server holds.
    pub async fn survey(&mut self) -> Result<Survey, StoreError> {
        let groups = self.marker_groups().await?;
        let mut survey = Survey::default();
        for marker in self.read_markers(&groups).await? {
            match marker {
                Some(e) => *survey.epochs.entry(e).or_default() += 1,
                None => survey.missing += 1,
            }
        }
        for (node, anchor) in self.anchors().await? {
            let mut hkeys = redis::cmd("HKEYS");
            hkeys.arg(self.layout.progress_key(anchor));
            let fields: Vec<String> =
                redis::from_redis_value(&self.conn.query_on(&node, &hkeys).await?)?;
            // One plain `<topic>:<partition>` field per partition (topic
            // names hold no `:`); the incarnations' fields beside it.
            let n = fields
                .iter()
                .filter(|f| f.matches(':').count() == 1)
                .count();
            survey.records.push((node, n));
        }
        Ok(survey)
    }

    async fn query(&mut self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        Ok(cmd.query_async(&mut self.conn).await?)
    }

    /// Per partition (in the order given), what each server says.
    pub async fn read(
        &mut self,
        tps: &[TopicPartition],
    ) -> Result<Vec<Vec<MasterRecord>>, StoreError> {
        let read = self.read_once(tps).await;
        if read.is_err() {
            self.anchors = None;
        }
        read
    }

    async fn read_once(
        &mut self,
        tps: &[TopicPartition],
    ) -> Result<Vec<Vec<MasterRecord>>, StoreError> {
        let mut out = vec![Vec::new(); tps.len()];
        if tps.is_empty() {
            return Ok(out);
        }
        for (node, anchor) in self.anchors().await? {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.layout.epoch_key(anchor));
            pipe.cmd("EXISTS").arg(self.layout.progress_key(anchor));
            // Per partition: the plain record, its owner and the
            // incarnation's own record (the last two "" where unknown).
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(self.layout.progress_key(anchor));
            let incarnations: Vec<Option<(String, String)>> =
                tps.iter().map(|tp| self.incarnation(tp)).collect();
            for (tp, inc) in tps.iter().zip(&incarnations) {
                hmget.arg(progress_field(tp)).arg(progress_owner_field(tp));
                hmget.arg(inc.as_ref().map_or("", |(field, _)| field.as_str()));
            }
            pipe.add_command(hmget);
            let replies = self.conn.pipeline_on(&node, &pipe).await?;
            let (Some(marker), Some(exists), Some(nexts)) =
                (replies.first(), replies.get(1), replies.get(2))
            else {
                return Err(StoreError::Protocol(format!("progress read: {replies:?}")));
            };
            let marker: Option<String> = redis::from_redis_value(marker)?;
            let has_records: bool = redis::from_redis_value(exists)?;
            let fields: Vec<Option<String>> = redis::from_redis_value(nexts)?;
            for (i, (inc, three)) in incarnations.iter().zip(fields.chunks(3)).enumerate() {
                let [plain, owner, own] = three else {
                    return Err(StoreError::Protocol(format!("progress read: {fields:?}")));
                };
                let (next, of_incarnation) =
                    record_of(plain.as_deref(), owner.as_deref(), own.as_deref(), inc)?;
                out[i].push(MasterRecord {
                    node: node.clone(),
                    marker: marker.clone(),
                    next,
                    has_records,
                    of_incarnation,
                });
            }
        }
        Ok(out)
    }

    /// Per partition (in the order given), the offsets every server says
    /// were decided (the intersection: a record counts as decided only where
    /// every master holds its effects). Unreadable ranges read as none.
    pub async fn read_decided(
        &mut self,
        partitions: &[(TopicPartition, TopicId)],
    ) -> Result<Vec<DecidedRanges>, StoreError> {
        let read = self.read_decided_once(partitions).await;
        if read.is_err() {
            self.anchors = None;
        }
        read
    }

    async fn read_decided_once(
        &mut self,
        partitions: &[(TopicPartition, TopicId)],
    ) -> Result<Vec<DecidedRanges>, StoreError> {
        let mut out: Vec<Option<DecidedRanges>> = vec![None; partitions.len()];
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        for (node, anchor) in self.anchors().await? {
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(self.layout.decided_key(anchor));
            for (tp, id) in partitions {
                hmget.arg(decided_field(tp, id));
            }
            let texts: Vec<Option<String>> =
                redis::from_redis_value(&self.conn.query_on(&node, &hmget).await?)?;
            for (slot, text) in out.iter_mut().zip(texts) {
                let here = text
                    .as_deref()
                    .and_then(DecidedRanges::decode)
                    .unwrap_or_default();
                *slot = Some(match slot.take() {
                    None => here,
                    Some(before) => before.intersect(&here),
                });
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Raises the records of `positions` to the given next offsets on every
    /// server (all concurrently), where the marker still is `epoch` and no
    /// record is below the expected minimum given with it (what the caller
    /// last wrote; `None`: no expectation), and adds `claims` to the decided
    /// ranges there. Refused: `EpochChanged`, `RolledBack`.
    pub async fn record(
        &mut self,
        epoch: &str,
        positions: &[(TopicPartition, i64, Option<i64>)],
        claims: &[Claim],
    ) -> Result<(), StoreError> {
        if positions.is_empty() && claims.is_empty() {
            return Ok(());
        }
        let anchors = self.anchors().await?;
        let calls = anchors.into_iter().map(|(node, anchor)| {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RECORD.source())
                .arg(3)
                .arg(self.layout.epoch_key(anchor))
                .arg(self.layout.progress_key(anchor))
                .arg(self.layout.decided_key(anchor))
                .arg(epoch)
                .arg(positions.len());
            for (tp, next, expected) in positions {
                let (field, id) = self.incarnation(tp).unwrap_or_default();
                cmd.arg(progress_field(tp))
                    .arg(field)
                    .arg(id)
                    .arg(*next)
                    .arg(expected.unwrap_or(-1));
            }
            for claim in claims {
                cmd.arg(decided_field(&claim.tp, &claim.topic_id))
                    .arg(claim.start)
                    .arg(claim.end);
            }
            async move {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd);
                conn.pipeline_on(&node, &pipe).await
            }
        });
        let results = futures_util::future::join_all(calls).await;
        if results.iter().any(Result::is_err) {
            self.anchors = None;
        }
        for result in results {
            result.map_err(|e| epoch_refusal(e, epoch))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of `record_of`.
    #[test]
    fn records_are_read_per_incarnation_by_table() {
        let this = Some(("t:0:aaaaaaaaaaaa".to_string(), "aaaaaaaaaaaa".to_string()));
        let table = [
            // (plain, owner, own, incarnation known) -> record
            (
                (Some("900"), Some("aaaaaaaaaaaa"), Some("40")),
                &this,
                (Some(40), true),
            ),
            ((Some("900"), None, Some("40")), &this, (Some(40), true)),
            (
                (Some("900"), Some("bbbbbbbbbbbb"), None),
                &this,
                (None, false),
            ),
            ((Some("900"), None, None), &this, (Some(900), false)),
            (
                (Some("900"), Some("aaaaaaaaaaaa"), None),
                &this,
                (Some(900), false),
            ),
            (
                (Some("900"), Some("bbbbbbbbbbbb"), None),
                &None,
                (Some(900), false),
            ),
            ((None, None, None), &this, (None, false)),
        ];
        for ((plain, owner, own), inc, want) in table {
            assert_eq!(
                record_of(plain, owner, own, inc).unwrap(),
                want,
                "{plain:?} {owner:?} {own:?} {inc:?}"
            );
        }
        assert!(record_of(Some("x"), None, None, &this).is_err());
    }
}

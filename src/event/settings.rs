//! The decoder's settings (the `[event]` section of the config): which
//! formats are read, where the envelope fields are, and the strictness rules.

/// JSON pointers (RFC 6901) to the envelope fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMap {
    pub id: String,
    pub entity: String,
    pub seq: String,
    pub kind: String,
    pub data: String,
    pub ts: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            id: "/id".into(),
            entity: "/entity".into(),
            seq: "/seq".into(),
            kind: "/type".into(),
            data: "/data".into(),
            ts: "/ts".into(),
        }
    }
}

/// Which record formats are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    /// CloudEvents when the record's headers say so, idem's envelope otherwise.
    Auto,
    Idem,
    CloudEvents,
}

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct EventConfig {
    pub format: EventFormat,
    pub fields: FieldMap,
    pub max_bytes: usize,
    /// `event.duplicate_keys = "reject"`: a repeated JSON object key makes the
    /// record invalid (`duplicate_key`); otherwise the last one wins.
    pub reject_duplicate_keys: bool,
    /// `event.key_mismatch = "dead_letter"`: a record whose key is not its
    /// entity is dead-lettered (`key_mismatch`); otherwise it is only counted.
    pub dead_letter_key_mismatch: bool,
}

//! Why a record is dead-lettered: one closed list, written once. The
//! decoder's reasons, `conflict`, the effects' planning and the guard
//! script's rejections; each is the `idem.reason` header's value, a label
//! of `idem_dead_letters_total`, and a choice of `idem dlq redrive --reason`.

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $text:literal,)*) => {
        /// Why a record is dead-lettered (docs/event-contract.md lists each).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in the documented order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];
            /// Every reason's name (for clap's possible values).
            pub const NAMES: &'static [&'static str] = &[$($text,)*];

            /// The name in headers, metrics and docs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => $text,)*
                }
            }

            /// The reason named `name`, if there is one.
            pub fn named(name: &str) -> Option<Reason> {
                match name {
                    $($text => Some(Reason::$name),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    EmptyValue = "empty_value",
    TooLarge = "too_large",
    NotUtf8 = "not_utf8",
    NotJson = "not_json",
    NotObject = "not_object",
    MissingField = "missing_field",
    EmptyField = "empty_field",
    WrongType = "wrong_type",
    SeqOutOfRange = "seq_out_of_range",
    BadTimestamp = "bad_timestamp",
    BadEntity = "bad_entity",
    DuplicateKey = "duplicate_key",
    KeyMismatch = "key_mismatch",
    /// An id seen before with another payload.
    Conflict = "conflict",
    EffectFieldMissing = "effect_field_missing",
    AmountNotNumeric = "amount_not_numeric",
    AmountExcessDecimals = "amount_excess_decimals",
    AmountOverflow = "amount_overflow",
    ChangeMalformed = "change_malformed",
    CounterOverflow = "counter_overflow",
    CounterUnreadable = "counter_unreadable",
    EffectFailed = "effect_failed",
    EffectInvalidOutput = "effect_invalid_output",
    /// A rejection whose reason the script did not name (a custom effect's).
    EffectRejected = "effect_rejected",
    SeqReused = "seq_reused",
    SeqGapClosed = "seq_gap_closed",
}

impl Reason {
    /// The reasons the guard script rejects with; its prelude names each
    /// `REASON_<NAME>`.
    pub const REJECTIONS: [Reason; 5] = [
        Reason::CounterOverflow,
        Reason::CounterUnreadable,
        Reason::EffectFailed,
        Reason::EffectInvalidOutput,
        Reason::SeqGapClosed,
    ];
}

/// A reason equals its name (tables of expected reasons read as the docs do).
impl PartialEq<&str> for Reason {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_named_once_and_read_back() {
        assert_eq!(Reason::ALL.len(), Reason::NAMES.len());
        for (reason, name) in Reason::ALL.iter().zip(Reason::NAMES) {
            assert_eq!(reason.as_str(), *name);
            assert_eq!(reason.to_string(), *name);
            assert!(*reason == *name && *reason != "nonsense");
            assert_eq!(Reason::named(name), Some(*reason));
        }
        let unique: std::collections::HashSet<_> = Reason::NAMES.iter().collect();
        assert_eq!(unique.len(), Reason::NAMES.len());
        assert_eq!(Reason::named("nonsense"), None);
    }
}

//! This build's release and commit, and what a group's members must run
//! for a config (docs/upgrading.md, "How versions work").
//!
//! Every `idem run` registers its version in the members registry; an
//! upgrade rule ("enable X only once every instance runs 0.3.0") is then a
//! comparison of versions, not a probe of features. Builds from before the
//! first release all said `0.2.0` while 0.3.0's changes landed: a member
//! registered as `0.2.0` is [`Release::Unknown`], older than every release.

use std::fmt;

use crate::config::{Config, GroupProtocol};
use crate::effects::StateOrder;

/// This build's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this build was made from: `IDEM_COMMIT` at build time (the
/// container build's argument), else git's HEAD, else `unknown` (build.rs).
pub const COMMIT: &str = env!("IDEM_COMMIT");
/// What `idem --version` prints after the name.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("IDEM_COMMIT"),
    ")"
);

/// A release as a member registers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Release {
    /// A build before the first release (it registered `0.2.0`), or a
    /// version that does not parse: older than every release.
    Unknown,
    /// `major.minor.patch`; a pre-release (`0.4.0-dev`) counts as the
    /// release before it is out, so as the one below (`patch` − 1 is not
    /// knowable): it sorts just below the release it leads to.
    Known {
        major: u32,
        minor: u32,
        patch: u32,
        final_: bool,
    },
}

impl Release {
    /// The version a member registered.
    pub fn parse(text: &str) -> Release {
        if text == "0.2.0" {
            return Release::Unknown;
        }
        let (core, pre) = match text.split_once('-') {
            Some((core, _)) => (core, true),
            None => (text.split('+').next().unwrap_or(text), false),
        };
        let mut parts = core.split('.').map(str::parse::<u32>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Release::Known {
                major,
                minor,
                patch,
                final_: !pre,
            },
            _ => Release::Unknown,
        }
    }

    /// This build's release.
    pub fn this() -> Release {
        Release::parse(VERSION)
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Release::Unknown => f.write_str("an unknown build older than 0.3.0"),
            Release::Known {
                major,
                minor,
                patch,
                final_,
            } => {
                write!(f, "{major}.{minor}.{patch}")?;
                if !final_ {
                    f.write_str(" (pre-release)")?;
                }
                Ok(())
            }
        }
    }
}

/// A setting a member must know before any member turns it on, and the
/// first release that knows it.
pub struct Gate {
    pub setting: &'static str,
    pub since: &'static str,
    pub enabled: fn(&Config) -> bool,
}

/// Every setting an older member would misread in a mixed group (the
/// "only once every instance runs" rules of docs/upgrading.md). A new
/// rule adds its row here with the release that brings it.
pub const GATES: &[Gate] = &[
    Gate {
        setting: "changelog.topics",
        since: "0.3.0",
        enabled: |c| !c.changelog.topics.is_empty(),
    },
    Gate {
        setting: "[[effects]] changes = true",
        since: "0.3.0",
        enabled: |c| c.effects.rules.iter().any(|rule| rule.changes),
    },
    Gate {
        setting: "[[effects]]",
        since: "0.3.0",
        enabled: |c| !c.effects.rules.is_empty(),
    },
    Gate {
        setting: "kafka.group_protocol = \"consumer\"",
        since: "0.3.0",
        enabled: |c| c.kafka.group_protocol == GroupProtocol::Consumer,
    },
    Gate {
        setting: "dedupe.dense_seq_topics",
        since: "0.3.0",
        enabled: |c| !c.dedupe.dense_seq_topics.is_empty(),
    },
    Gate {
        setting: "state.order = \"per_field\"",
        since: "0.3.0",
        enabled: |c| c.effects.state_order == StateOrder::PerField,
    },
];

/// The settings `config` turns on that a member running `member` does not
/// know, with the release each needs.
pub fn held_back(config: &Config, member: Release) -> Vec<(&'static str, &'static str)> {
    GATES
        .iter()
        .filter(|g| (g.enabled)(config) && member < Release::parse(g.since))
        .map(|g| (g.setting, g.since))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_order_and_the_builds_before_the_first_are_older_than_all() {
        let r = Release::parse;
        assert_eq!(r("0.2.0"), Release::Unknown);
        assert_eq!(r("garbage"), Release::Unknown);
        assert!(r("0.2.0") < r("0.3.0"));
        assert!(r("0.3.0") < r("0.3.1") && r("0.3.1") < r("0.10.0"));
        assert!(r("0.4.0-dev") < r("0.4.0") && r("0.3.0") < r("0.4.0-dev"));
        assert_eq!(r("1.2.3+build.5"), r("1.2.3"));
        assert_eq!(r("0.3.0").to_string(), "0.3.0");
        assert!(Release::this() >= r("0.3.0"), "this build is {VERSION}");
    }

    #[test]
    fn a_setting_is_held_back_by_a_member_older_than_its_release() {
        let mut config = Config::defaults();
        assert!(held_back(&config, Release::Unknown).is_empty());
        config.dedupe.dense_seq_topics = vec!["orders".into()];
        assert_eq!(
            held_back(&config, Release::Unknown),
            vec![("dedupe.dense_seq_topics", "0.3.0")]
        );
        assert!(held_back(&config, Release::parse("0.3.0")).is_empty());
    }
}

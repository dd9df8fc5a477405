//! One line of `idem check`'s report.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub status: Status,
    pub what: String,
    pub detail: String,
}

pub(super) fn line(status: Status, what: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        status,
        what: what.into(),
        detail: detail.into(),
    }
}

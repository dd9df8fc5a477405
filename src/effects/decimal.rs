//! Exact decimal amounts for counters: a value is an integer count of
//! `10^-scale` units (`12.50` at scale 2 is 1250), never a binary float.
//!
//! Guarantee: parsing is total (text in, amount or a reason out) and exact;
//! an amount with more decimals than the scale is refused, never rounded;
//! every value, amount or sum, has at most [`MAX_DIGITS`] digits, so the
//! arithmetic fits an `i128` here and digit strings in `decimal.lua`.

use std::fmt;

/// Digits of a scaled value (integer and decimal digits together): 38, as
/// SQL's `DECIMAL(38, s)`; room for 18-decimal token amounts with 20
/// integer digits, or cents with 36.
pub const MAX_DIGITS: u32 = 38;

/// The largest scale a counter may declare (one integer digit remains).
pub const MAX_SCALE: u8 = 37;

/// Why a text is not an amount of a counter. The codes are dead-letter reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("{text:?} is not a decimal number (digits, an optional sign and point; no exponent)")]
    NotNumeric { text: String },
    #[error("{text:?} has more than {scale} decimals (the counter's scale); idem never rounds an amount")]
    ExcessDecimals { text: String, scale: u8 },
    #[error("{text:?} has more than {MAX_DIGITS} digits at scale {scale}")]
    TooLarge { text: String, scale: u8 },
}

impl AmountError {
    pub fn code(&self) -> crate::event::Reason {
        use crate::event::Reason;
        match self {
            AmountError::NotNumeric { .. } => Reason::AmountNotNumeric,
            AmountError::ExcessDecimals { .. } => Reason::AmountExcessDecimals,
            AmountError::TooLarge { .. } => Reason::AmountOverflow,
        }
    }
}

/// An exact amount: `units × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount {
    pub units: i128,
    pub scale: u8,
}

fn limit() -> i128 {
    10i128.pow(MAX_DIGITS)
}

impl Amount {
    pub fn zero(scale: u8) -> Amount {
        Amount { units: 0, scale }
    }

    /// Parses `text` (a JSON number's text or a string's content) at
    /// `scale`. Accepted: `-12.5`, `12.50`, `+3`, `0.000` (trailing zeros
    /// beyond the scale are exact, so accepted). Refused: exponents, `NaN`,
    /// empty, more significant decimals than the scale, more than 38 digits.
    ///
    /// | text      | scale | result                 |
    /// |-----------|-------|------------------------|
    /// | `12.5`    | 2     | 1250                   |
    /// | `-0.05`   | 2     | -5                     |
    /// | `1.230`   | 2     | 123                    |
    /// | `1.005`   | 2     | excess decimals        |
    /// | `1e3`     | 0     | not numeric            |
    pub fn parse(text: &str, scale: u8) -> Result<Amount, AmountError> {
        let not_numeric = || AmountError::NotNumeric {
            text: text.to_string(),
        };
        let (negative, body) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !all_digits(int) || !all_digits(frac) || body.ends_with('.') {
            return Err(not_numeric());
        }
        let significant = frac.trim_end_matches('0');
        if significant.len() > scale as usize {
            return Err(AmountError::ExcessDecimals {
                text: text.to_string(),
                scale,
            });
        }
        let too_large = || AmountError::TooLarge {
            text: text.to_string(),
            scale,
        };
        let int = int.trim_start_matches('0');
        if int.len() + scale as usize > MAX_DIGITS as usize {
            return Err(too_large());
        }
        let mut units: i128 = 0;
        let digits = int
            .bytes()
            .chain(significant.bytes())
            .chain(std::iter::repeat_n(
                b'0',
                scale as usize - significant.len(),
            ));
        for d in digits {
            units = units * 10 + i128::from(d - b'0');
        }
        if units >= limit() {
            return Err(too_large());
        }
        Ok(Amount {
            units: if negative { -units } else { units },
            scale,
        })
    }

    /// `self + other` (same scale), or `None` past 38 digits.
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        let units = self.units.checked_add(other.units)?;
        (units.abs() < limit()).then_some(Amount {
            units,
            scale: self.scale,
        })
    }

    pub fn negated(self) -> Amount {
        Amount {
            units: -self.units,
            ..self
        }
    }

    /// The units as signed decimal digits, the form `decimal.lua` adds.
    pub fn units_text(self) -> String {
        self.units.to_string()
    }
}

/// The stored form: exactly `scale` decimals (`12.50`, `-0.05`, `0.00`, `7`).
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.units.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        let sign = if self.units < 0 { "-" } else { "" };
        if scale == 0 {
            write!(f, "{sign}{int}")
        } else {
            write!(f, "{sign}{int}.{frac}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_by_table() {
        let thirty = "123456789012345678901234567890";
        let cases: &[(&str, u8, Result<i128, &str>)] = &[
            ("12.5", 2, Ok(1250)),
            ("12.50", 2, Ok(1250)),
            ("-0.05", 2, Ok(-5)),
            ("+3", 0, Ok(3)),
            ("1.230", 2, Ok(123)),
            ("0007", 1, Ok(70)),
            ("-0", 2, Ok(0)),
            (thirty, 2, Ok(12345678901234567890123456789000)),
            ("1.005", 2, Err("amount_excess_decimals")),
            ("0.1", 0, Err("amount_excess_decimals")),
            ("1e3", 0, Err("amount_not_numeric")),
            ("", 0, Err("amount_not_numeric")),
            ("-", 0, Err("amount_not_numeric")),
            (".5", 1, Err("amount_not_numeric")),
            ("5.", 1, Err("amount_not_numeric")),
            ("1,5", 1, Err("amount_not_numeric")),
            ("NaN", 1, Err("amount_not_numeric")),
            ("\"5\"", 1, Err("amount_not_numeric")),
            (&"9".repeat(38), 0, Ok(10i128.pow(38) - 1)),
            (&"9".repeat(39), 0, Err("amount_overflow")),
            (&"9".repeat(37), 2, Err("amount_overflow")),
        ];
        for (text, scale, want) in cases {
            let got = Amount::parse(text, *scale)
                .map(|a| a.units)
                .map_err(|e| e.code().as_str());
            assert_eq!(got, *want, "{text:?} at scale {scale}");
        }
    }

    #[test]
    fn formats_with_exactly_the_scale() {
        for (units, scale, want) in [
            (1250, 2, "12.50"),
            (-5, 2, "-0.05"),
            (0, 2, "0.00"),
            (7, 0, "7"),
            (-7, 0, "-7"),
            (1, 18, "0.000000000000000001"),
        ] {
            assert_eq!(Amount { units, scale }.to_string(), want);
            assert_eq!(Amount::parse(want, scale).unwrap().units, units, "{want}");
        }
    }

    #[test]
    fn sums_stop_at_38_digits() {
        let max = Amount::parse(&"9".repeat(38), 0).unwrap();
        assert_eq!(max.checked_add(Amount { units: 1, scale: 0 }), None);
        assert_eq!(max.negated().checked_add(max.negated()), None);
        assert_eq!(
            max.checked_add(max.negated()).map(|a| a.units),
            Some(0),
            "opposite signs always fit"
        );
    }
}

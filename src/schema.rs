//! Declared message schemas for ingest routes (the DataBrew/Blink "stream schema"): a list of
//! typed columns every message must match. Runtime-free; built by [`crate::config`] and
//! checked by the ingest route for each message.
//!
//! A message matches when it is one JSON object and, for every column in order: the key is
//! present (or the column is nullable), its value is `null` only if the column is nullable,
//! and otherwise has the column's type. Fields that are not columns are allowed or refused
//! by [`ExtraFields`]. The first mismatch is the reason given, e.g.
//! `column "id": expected integer, got string`.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// Is `data` one JSON value (RFC 8259), UTF-8 throughout? The check for `json` ingest routes
/// and sources. It parses without building the value, so it also accepts what is valid JSON
/// but has no `serde_json::Value` (numbers beyond `f64` such as `1e400`, escaped lone
/// surrogates, nesting deeper than 128), and the message is passed on byte for byte, never
/// re-parsed. `serde_json` does not check UTF-8 inside strings it skips, so that is checked
/// first: a binary frame carrying `{"a":"\xff"}` is not JSON.
pub fn is_json(data: &[u8]) -> bool {
    simdutf8::basic::from_utf8(data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// The type of a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// A JSON string.
    String,
    /// A JSON number without fraction or exponent that fits in 64 bits (signed or unsigned).
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
    /// A JSON string holding an RFC 3339 date-time (`2024-05-01T12:00:00Z`,
    /// `2024-05-01T12:00:00.250+02:00`).
    Timestamp,
}

impl ColumnType {
    /// The name used in the configuration and in reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::Object => "object",
            Self::Array => "array",
            Self::Timestamp => "timestamp",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            Self::String => v.is_string(),
            Self::Integer => v.is_i64() || v.is_u64(),
            Self::Number => v.is_number(),
            Self::Boolean => v.is_boolean(),
            Self::Object => v.is_object(),
            Self::Array => v.is_array(),
            Self::Timestamp => v.as_str().is_some_and(is_rfc3339),
        }
    }
}

impl FromStr for ColumnType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "string" => Self::String,
            "integer" => Self::Integer,
            "number" => Self::Number,
            "boolean" => Self::Boolean,
            "object" => Self::Object,
            "array" => Self::Array,
            "timestamp" => Self::Timestamp,
            other => {
                return Err(format!(
                    "unknown column type `{other}` (expected string, integer, number, boolean, \
                     object, array or timestamp)"
                ));
            }
        })
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The object key.
    pub name: String,
    /// The type of its non-null values.
    pub ty: ColumnType,
    /// May the key be missing or its value `null`?
    pub nullable: bool,
}

/// What to do with object keys that are not columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraFields {
    /// Pass them through unchanged.
    Allow,
    /// The message is invalid.
    Refuse,
}

/// A validated schema: unique, non-empty column names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// Columns, checked in this order (the first mismatch is reported).
    pub columns: Vec<Column>,
    /// Keys that are not columns.
    pub extra: ExtraFields,
}

/// The JSON type name of a value, as reasons print it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Schema {
    /// Check one message.
    ///
    /// # Errors
    /// Why the message does not match, naming the column (never quoting its value, which
    /// the dead-letter line carries whole anyway).
    pub fn check(&self, msg: &[u8]) -> Result<(), String> {
        let v: Value = serde_json::from_slice(msg).map_err(|_| "not a JSON value".to_string())?;
        let Value::Object(obj) = v else {
            return Err(format!("not a JSON object (got {})", type_name(&v)));
        };
        for c in &self.columns {
            match obj.get(&c.name) {
                None if c.nullable => {}
                None => return Err(format!("column \"{}\": missing", c.name)),
                Some(Value::Null) if c.nullable => {}
                Some(Value::Null) => {
                    return Err(format!(
                        "column \"{}\": null in a non-nullable column",
                        c.name
                    ));
                }
                Some(v) if c.ty.matches(v) => {}
                Some(Value::String(_)) if c.ty == ColumnType::Timestamp => {
                    return Err(format!(
                        "column \"{}\": expected timestamp, got a string that is not RFC 3339",
                        c.name
                    ));
                }
                Some(v) => {
                    return Err(format!(
                        "column \"{}\": expected {}, got {}",
                        c.name,
                        c.ty,
                        type_name(v)
                    ));
                }
            }
        }
        if self.extra == ExtraFields::Refuse {
            if let Some(k) = obj
                .keys()
                .find(|k| !self.columns.iter().any(|c| &c.name == *k))
            {
                return Err(format!("field \"{k}\" is not in the schema"));
            }
        }
        Ok(())
    }
}

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, `T`/`Z` in either case,
/// fields in range (day within its month, leap years, second 60 for leap seconds).
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    let (Some(year), Some(month), Some(day)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let (Some(hour), Some(min), Some(sec)) = (num(11..13), num(14..16), num(17..19)) else {
        return false;
    };
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || min > 59 || sec > 60 {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        i += 1 + digits;
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len()
                && sep(i + 3, b":")
                && num(i + 1..i + 3).is_some_and(|h| h <= 23)
                && num(i + 4..i + 6).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_json_is_the_grammar_in_utf8() {
        use super::is_json;
        for ok in [
            &b"{\"v\": 1e400,\n \"id\": 7}"[..],
            b"\"\\ud800\"",
            b" [1, 2.5, true, null] ",
            "{\"k\":\"\u{e9}\"}".as_bytes(),
        ] {
            assert!(is_json(ok), "{}", String::from_utf8_lossy(ok));
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(is_json(deep.as_bytes()));
        for bad in [
            &b"{\"a\":\"\xff\"}"[..],
            b"{\"a\":1",
            b"\"raw\nnewline\"",
            b"",
            b"1 2",
        ] {
            assert!(!is_json(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    use super::*;

    fn schema(extra: ExtraFields) -> Schema {
        let col = |name: &str, ty, nullable| Column {
            name: name.into(),
            ty,
            nullable,
        };
        Schema {
            columns: vec![
                col("id", ColumnType::Integer, false),
                col("name", ColumnType::String, true),
                col("price", ColumnType::Number, false),
                col("ok", ColumnType::Boolean, true),
                col("tags", ColumnType::Array, true),
                col("attrs", ColumnType::Object, true),
                col("at", ColumnType::Timestamp, true),
            ],
            extra,
        }
    }

    #[test]
    fn good_rows_pass() {
        let s = schema(ExtraFields::Refuse);
        for row in [
            r#"{"id":1,"price":2}"#,
            r#"{"id":-5,"price":2.5,"name":null,"ok":true,"tags":[1],"attrs":{},"at":"2024-02-29T23:59:60.5+01:00"}"#,
            r#"{"id":18446744073709551615,"price":1e3}"#,
        ] {
            assert_eq!(s.check(row.as_bytes()), Ok(()), "{row}");
        }
        assert_eq!(
            schema(ExtraFields::Allow).check(br#"{"id":1,"price":0,"more":"x"}"#),
            Ok(())
        );
    }

    #[test]
    fn bad_rows_are_named_precisely() {
        let s = schema(ExtraFields::Refuse);
        for (row, reason) in [
            ("nope", "not a JSON value"),
            ("[1]", "not a JSON object (got array)"),
            (r#"{"price":1}"#, r#"column "id": missing"#),
            (
                r#"{"id":null,"price":1}"#,
                r#"column "id": null in a non-nullable column"#,
            ),
            (
                r#"{"id":"7","price":1}"#,
                r#"column "id": expected integer, got string"#,
            ),
            (
                r#"{"id":1.5,"price":1}"#,
                r#"column "id": expected integer, got number"#,
            ),
            (
                r#"{"id":1,"price":"1"}"#,
                r#"column "price": expected number, got string"#,
            ),
            (
                r#"{"id":1,"price":1,"ok":1}"#,
                r#"column "ok": expected boolean, got integer"#,
            ),
            (
                r#"{"id":1,"price":1,"tags":{}}"#,
                r#"column "tags": expected array, got object"#,
            ),
            (
                r#"{"id":1,"price":1,"attrs":[]}"#,
                r#"column "attrs": expected object, got array"#,
            ),
            (
                r#"{"id":1,"price":1,"at":"yesterday"}"#,
                r#"column "at": expected timestamp, got a string that is not RFC 3339"#,
            ),
            (
                r#"{"id":1,"price":1,"at":5}"#,
                r#"column "at": expected timestamp, got integer"#,
            ),
            (
                r#"{"id":1,"price":1,"extra":0}"#,
                r#"field "extra" is not in the schema"#,
            ),
        ] {
            assert_eq!(s.check(row.as_bytes()), Err(reason.to_string()), "{row}");
        }
    }

    #[test]
    fn rfc3339() {
        for ok in [
            "2024-05-01T12:00:00Z",
            "2024-05-01t12:00:00z",
            "2024-05-01T12:00:00.123456789-07:30",
            "2000-02-29T00:00:00+00:00",
            "2016-12-31T23:59:60Z",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01 12:00:00Z",
            "2024-05-01T12:00:00",
            "2024-13-01T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "1900-02-29T12:00:00Z",
            "2024-04-31T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0100",
            "2024-05-01T12:00:00+01:00x",
            "2024-05-01T12:00:00ZZ",
            "２024-05-01T12:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}

//! A completed piece of work as the platform reports it (a booking, an order,
//! a bounty), checked at the edge before anything is written: the CLI, the
//! import files (CSV and JSON lines) and the HTTP endpoint all go through
//! [`RawEarning::validate`], so every way in refuses the same things with the
//! same message naming the field. Pure: `now` is passed in.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Currency, Money, MoneyError, Policy};

/// A field of an earning that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field (`gross`, `currency`, `payee_id`, ...).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn field_err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The fields of an earning as text, before any checking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEarning {
    /// The payee's id.
    pub payee_id: String,
    /// Where it comes from (`booking`, `order`, `bounty`, ...).
    pub source: String,
    /// The source's own id for it; with `source`, unique.
    pub external_ref: String,
    /// Gross amount, exact decimal (`"120.50"`).
    pub gross: String,
    /// ISO 4217 code.
    pub currency: String,
    /// When the work was completed (RFC 3339); absent means now.
    pub completed_at: Option<String>,
}

/// A checked earning, ready to be recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewEarning {
    /// The payee's id (its existence is checked by the database layer).
    pub payee_id: i64,
    /// Where it comes from.
    pub source: String,
    /// The source's id for it.
    pub external_ref: String,
    /// Gross amount and currency.
    pub gross: Money,
    /// When the work was completed.
    pub completed_at: DateTime<Utc>,
    /// When it becomes payable: `completed_at` plus the policy's hold.
    pub release_at: DateTime<Utc>,
}

/// The fields an earning has, in the order of the CSV header.
pub const FIELDS: [&str; 6] = [
    "payee_id",
    "source",
    "external_ref",
    "gross",
    "currency",
    "completed_at",
];

/// A trimmed text field: not empty, at most `max` characters, no control characters.
pub(crate) fn text_field(field: &str, v: &str, max: usize) -> Result<String, FieldError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(field_err(field, "must not be empty"));
    }
    if v.chars().count() > max {
        return Err(field_err(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(field_err(field, "must not contain control characters"));
    }
    Ok(v.to_string())
}

impl RawEarning {
    /// Checks every field against the policy (the currency must be one it
    /// pays out); the error names the first bad field.
    pub fn validate(&self, policy: &Policy, now: DateTime<Utc>) -> Result<NewEarning, FieldError> {
        let payee_id: i64 = self
            .payee_id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| {
                field_err(
                    "payee_id",
                    format!("{:?} is not a positive integer", self.payee_id),
                )
            })?;
        let source = text_field("source", &self.source, 100)?;
        let external_ref = text_field("external_ref", &self.external_ref, 255)?;
        let currency: Currency = self
            .currency
            .trim()
            .parse()
            .map_err(|e: MoneyError| field_err("currency", e.to_string()))?;
        if policy.minimum(currency).is_none() {
            return Err(field_err(
                "currency",
                format!("{currency} is not paid out by the policy (no minimum_payout.{currency})"),
            ));
        }
        let gross = Money::parse(&self.gross, currency.code())
            .map_err(|e| field_err("gross", e.to_string()))?;
        if let Some(max) = policy.maximum_earning(currency) {
            if gross.amount() > max {
                return Err(field_err(
                    "gross",
                    format!(
                        "{} {currency} is over the policy's maximum earning of {max} {currency} (maximum_earning.{currency})",
                        self.gross.trim()
                    ),
                ));
            }
        }
        let completed_at = match self.completed_at.as_deref().map(str::trim) {
            None | Some("") => now,
            Some(s) => DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    field_err(
                        "completed_at",
                        format!("{s:?} is not an RFC 3339 time such as 2026-11-20T15:00:00Z"),
                    )
                })?,
        };
        if completed_at > now {
            return Err(field_err(
                "completed_at",
                format!("{} is in the future", completed_at.to_rfc3339()),
            ));
        }
        let horizon = now - chrono::Duration::days(i64::from(policy.earning_horizon_days));
        if completed_at < horizon {
            return Err(field_err(
                "completed_at",
                format!(
                    "{} is more than {} days ago (the policy's earning_horizon_days)",
                    completed_at.to_rfc3339(),
                    policy.earning_horizon_days
                ),
            ));
        }
        Ok(NewEarning {
            payee_id,
            source,
            external_ref,
            gross,
            completed_at,
            release_at: policy.release_at(completed_at),
        })
    }

    /// Reads a JSON object. Amounts must be strings: a JSON number is a float
    /// and may already have lost a digit.
    pub fn from_json(v: &serde_json::Value) -> Result<RawEarning, FieldError> {
        let obj = v
            .as_object()
            .ok_or_else(|| field_err("body", "must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(field_err(
                k,
                format!("unknown field (expected {})", FIELDS.join(", ")),
            ));
        }
        let text = |name: &str, required: bool| -> Result<Option<String>, FieldError> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) if required => {
                    Err(field_err(name, "is missing"))
                }
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) if name == "payee_id" => Ok(Some(n.to_string())),
                Some(serde_json::Value::Number(n)) if name == "gross" => Err(field_err(
                    name,
                    format!("must be a string such as \"{n}\" (a JSON number is a float)"),
                )),
                Some(_) => Err(field_err(name, "must be a string")),
            }
        };
        Ok(RawEarning {
            payee_id: text("payee_id", true)?.unwrap_or_default(),
            source: text("source", true)?.unwrap_or_default(),
            external_ref: text("external_ref", true)?.unwrap_or_default(),
            gross: text("gross", true)?.unwrap_or_default(),
            currency: text("currency", true)?.unwrap_or_default(),
            completed_at: text("completed_at", false)?,
        })
    }
}

/// One row of an import file: its line number and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 1-based line number in the file.
    pub line: usize,
    /// The fields, or why the line could not be read.
    pub fields: Result<RawEarning, FieldError>,
}

/// The formats `payoutctl earnings import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// Comma-separated, with a header line naming the columns.
    Csv,
    /// One JSON object per line.
    JsonLines,
}

impl FileFormat {
    /// By extension (`.csv`, `.jsonl`, `.ndjson`), else by the first character
    /// of `text` (the start of the file is enough).
    pub fn detect(path: &str, text: &str) -> FileFormat {
        let lower = path.to_ascii_lowercase();
        let json_ext = lower.ends_with(".jsonl") || lower.ends_with(".ndjson");
        let looks_json = text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('{');
        if !lower.ends_with(".csv") && (json_ext || looks_json) {
            FileFormat::JsonLines
        } else {
            FileFormat::Csv
        }
    }

    /// Reads `text` into rows; `Err` only when the whole file is unreadable
    /// (a CSV header that is wrong), naming line 1. The same reading as
    /// [`RowReader`], all at once.
    pub fn parse(self, text: &str) -> Result<Vec<Row>, FieldError> {
        let reader = RowReader::new(text.as_bytes(), self).map_err(|e| match e {
            ReadError::Header(e) => e,
            ReadError::Io(e) => unreachable!("reading a string cannot fail: {e}"),
        })?;
        Ok(reader
            .map(|row| row.expect("reading a string cannot fail"))
            .collect())
    }
}

/// Why an import file could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The CSV header is wrong (the error names line 1).
    #[error("{0}")]
    Header(FieldError),
    /// The file could not be read.
    #[error("failed to read: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads an import file a line at a time, so a file of any size is read in
/// constant memory: blank lines are skipped (but counted in line numbers), a
/// byte-order mark at the start is ignored, lines end with LF or CRLF (the
/// last one may have no end). A line that is not UTF-8 is a refused row
/// (field `row`); a CSV header that is wrong refuses the whole file.
pub struct RowReader<R> {
    inner: R,
    format: FileFormat,
    /// The CSV header's columns, lower case (empty for JSON lines).
    columns: Vec<String>,
    /// The number of the last line read.
    line: usize,
    buf: Vec<u8>,
}

/// One line of the file: its number and text (or why it is not text).
type Line = (usize, Result<String, FieldError>);

impl<R: std::io::BufRead> RowReader<R> {
    /// Starts reading; for CSV, reads and checks the header.
    pub fn new(inner: R, format: FileFormat) -> Result<RowReader<R>, ReadError> {
        let mut reader = RowReader {
            inner,
            format,
            columns: Vec::new(),
            line: 0,
            buf: Vec::with_capacity(256),
        };
        if format == FileFormat::Csv {
            if let Some((_, header)) = reader.next_line()? {
                let header_err = |m: String| ReadError::Header(field_err("line 1", m));
                let header = header.map_err(|e| header_err(e.message))?;
                reader.columns = check_header(&header).map_err(header_err)?;
            }
        }
        Ok(reader)
    }

    /// The next line that is not blank.
    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            self.buf.clear();
            if self.inner.read_until(b'\n', &mut self.buf)? == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            if let Some(b) = bytes.strip_suffix(b"\n") {
                bytes = b;
            }
            while let Some(b) = bytes.strip_suffix(b"\r") {
                bytes = b;
            }
            if self.line == 1 {
                while let Some(b) = bytes.strip_prefix("\u{feff}".as_bytes()) {
                    bytes = b;
                }
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(t) if t.trim().is_empty() => continue,
                Ok(t) => Ok(t.to_string()),
                Err(_) => Err(field_err("row", "is not valid UTF-8 text")),
            };
            return Ok(Some((self.line, text)));
        }
    }

    fn row(&self, line: usize, text: Result<String, FieldError>) -> Row {
        let fields = text.and_then(|l| match self.format {
            FileFormat::Csv => csv_row(&self.columns, &l),
            FileFormat::JsonLines => serde_json::from_str::<serde_json::Value>(&l)
                .map_err(|e| field_err("row", format!("not JSON: {e}")))
                .and_then(|v| RawEarning::from_json(&v)),
        });
        Row { line, fields }
    }
}

impl<R: std::io::BufRead> Iterator for RowReader<R> {
    type Item = std::io::Result<Row>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_line() {
            Ok(Some((line, text))) => Some(Ok(self.row(line, text))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Splits one CSV line (RFC 4180 quoting: `"a, b"`, `""` for a quote; a field
/// may not span lines).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                '"' => quoted = false,
                _ => cur.push(c),
            }
        } else {
            match c {
                ',' => {
                    fields.push(std::mem::take(&mut cur));
                    was_quoted = false;
                }
                '"' if cur.trim().is_empty() && !was_quoted => {
                    cur.clear();
                    quoted = true;
                    was_quoted = true;
                }
                '"' => return Err("a quote inside an unquoted field".into()),
                _ if was_quoted && !c.is_whitespace() => {
                    return Err("text after a closing quote".into());
                }
                _ => cur.push(c),
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    fields.push(cur);
    Ok(fields)
}

/// The header's columns, lower case, or why it is wrong.
fn check_header(header: &str) -> Result<Vec<String>, String> {
    let columns: Vec<String> = split_csv(header)?
        .into_iter()
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    for (i, c) in columns.iter().enumerate() {
        if !FIELDS.contains(&c.as_str()) {
            return Err(format!(
                "unknown column {c:?} in the header (expected {})",
                FIELDS.join(",")
            ));
        }
        if columns[..i].contains(c) {
            return Err(format!("column {c:?} appears twice"));
        }
    }
    if let Some(missing) = FIELDS[..5]
        .iter()
        .find(|f| !columns.iter().any(|c| c == *f))
    {
        return Err(format!(
            "the header has no {missing:?} column (expected {})",
            FIELDS.join(",")
        ));
    }
    Ok(columns)
}

fn csv_row(columns: &[String], line: &str) -> Result<RawEarning, FieldError> {
    let values = split_csv(line).map_err(|m| field_err("row", m))?;
    if values.len() != columns.len() {
        return Err(field_err(
            "row",
            format!(
                "has {} fields, the header has {}",
                values.len(),
                columns.len()
            ),
        ));
    }
    let mut raw = RawEarning::default();
    for (c, v) in columns.iter().zip(values) {
        match c.as_str() {
            "payee_id" => raw.payee_id = v,
            "source" => raw.source = v,
            "external_ref" => raw.external_ref = v,
            "gross" => raw.gross = v,
            "currency" => raw.currency = v,
            _ => raw.completed_at = Some(v),
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        include_str!("../../config/policy.toml").parse().unwrap()
    }

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn raw(gross: &str, currency: &str) -> RawEarning {
        RawEarning {
            payee_id: "7".into(),
            source: "booking".into(),
            external_ref: "B-1".into(),
            gross: gross.into(),
            currency: currency.into(),
            completed_at: Some("2026-11-20T15:00:00Z".into()),
        }
    }

    fn field_of(r: RawEarning) -> String {
        r.validate(&policy(), now()).unwrap_err().field
    }

    #[test]
    fn a_good_earning_is_released_after_the_hold() {
        let e = raw("120.50", "USD").validate(&policy(), now()).unwrap();
        assert_eq!(
            e.release_at,
            "2026-11-27T15:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(e.gross.to_minor_units(), Ok(12050));
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(field_of(raw("0", "USD")), "gross");
        assert_eq!(field_of(raw("-5", "USD")), "gross");
        assert_eq!(field_of(raw("1.001", "USD")), "gross");
        assert_eq!(field_of(raw("1.5", "JPY")), "gross");
        assert_eq!(field_of(raw("1", "XYZ")), "currency");
        assert_eq!(field_of(raw("1", "KRW")), "currency", "not in the policy");
        assert_eq!(
            field_of(RawEarning {
                payee_id: "x".into(),
                ..raw("1", "USD")
            }),
            "payee_id"
        );
        assert_eq!(
            field_of(RawEarning {
                source: " ".into(),
                ..raw("1", "USD")
            }),
            "source"
        );
        assert_eq!(
            field_of(RawEarning {
                completed_at: Some("2027-01-01T00:00:00Z".into()),
                ..raw("1", "USD")
            }),
            "completed_at"
        );
    }

    #[test]
    fn an_earning_over_the_maximum_or_older_than_the_horizon_is_refused_naming_the_field() {
        let over = raw("90000000000000000.00", "USD")
            .validate(&policy(), now())
            .unwrap_err();
        assert_eq!(over.field, "gross");
        assert!(
            over.message.contains("maximum earning of 10000.00 USD"),
            "{over}"
        );
        assert!(raw("10000.00", "USD").validate(&policy(), now()).is_ok());
        let ancient = RawEarning {
            completed_at: Some("0001-01-01T00:00:00Z".into()),
            ..raw("1", "USD")
        }
        .validate(&policy(), now())
        .unwrap_err();
        assert_eq!(ancient.field, "completed_at");
        assert!(
            ancient.message.contains("more than 90 days ago"),
            "{ancient}"
        );
    }

    #[test]
    fn csv_rows_keep_their_line_numbers_and_quotes() {
        let text = "payee_id,source,external_ref,gross,currency\n\n1,booking,\"B,1\",10.00,USD\n1,booking,B2,10.00\n";
        let rows = FileFormat::Csv.parse(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[0].fields.as_ref().unwrap().external_ref, "B,1");
        assert_eq!(rows[1].line, 4);
        assert!(
            rows[1]
                .fields
                .as_ref()
                .unwrap_err()
                .message
                .contains("4 fields")
        );
        let e = FileFormat::Csv.parse("payee,source\n").unwrap_err();
        assert_eq!(e.field, "line 1");
    }

    #[test]
    fn json_numbers_for_gross_are_refused() {
        let rows = FileFormat::JsonLines.parse(
            "{\"payee_id\": 1, \"source\": \"s\", \"external_ref\": \"r\", \"gross\": 10.5, \"currency\": \"USD\"}\nnot json\n",
        )
        .unwrap();
        assert_eq!(rows[0].fields.as_ref().unwrap_err().field, "gross");
        assert_eq!(rows[1].line, 2);
        assert_eq!(rows[1].fields.as_ref().unwrap_err().field, "row");
    }
}

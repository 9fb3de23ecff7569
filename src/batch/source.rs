//! Reading a batch file into rows: CSV (RFC 4180 through the `csv` crate: a header row, quoted
//! fields with commas, quotes and newlines inside, an optional UTF-8 BOM) or JSONL (one object
//! per line; blank lines are skipped). Every row keeps the line of the file it starts on, which
//! is how errors name it.

use serde_json::{Map, Value};

use super::RowError;

/// The kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// The format a file name says (`.csv`, `.jsonl`, `.ndjson`), if it says one.
    pub fn from_path(path: &str) -> Option<Format> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(Format::Csv)
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Some(Format::Jsonl)
        } else {
            None
        }
    }
}

/// One row of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The 1-based line the row starts on (a CSV row with newlines in a field spans several).
    pub line: u64,
    /// Column -> value: strings for CSV, the values with their JSON types for JSONL.
    pub values: Map<String, Value>,
}

/// A whole file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// The columns in file order: the CSV header, or for JSONL the keys in order of first
    /// appearance (those first seen on the same line in name order).
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads a whole file. Rows that cannot be read are returned as errors, each naming its line;
/// the rows that could be read come back too so the caller can report every problem at once.
pub fn read(bytes: &[u8], format: Format) -> (Table, Vec<RowError>) {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match format {
        Format::Csv => read_csv(bytes),
        Format::Jsonl => read_jsonl(bytes),
    }
}

fn read_csv(bytes: &[u8]) -> (Table, Vec<RowError>) {
    let mut errors = Vec::new();
    let mut table = Table::default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    match reader.headers() {
        Ok(h) => {
            for (i, name) in h.iter().enumerate() {
                if name.trim().is_empty() {
                    errors.push(RowError::new(1, format!("column {} has no name", i + 1)));
                } else if table.columns.iter().any(|c| c == name) {
                    errors.push(RowError::new(1, format!("column {name:?} appears twice")));
                }
                table.columns.push(name.to_owned());
            }
        }
        Err(e) => {
            errors.push(RowError::new(1, format!("cannot read the header: {e}")));
            return (table, errors);
        }
    }
    if table.columns.is_empty() {
        errors.push(RowError::new(1, "the file has no header row".to_owned()));
        return (table, errors);
    }
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                // A line with nothing on it is no row (a trailing blank line, say).
                if record.len() == 1 && record.get(0).is_some_and(str::is_empty) {
                    continue;
                }
                let values = table
                    .columns
                    .iter()
                    .zip(record.iter())
                    .map(|(c, v)| (c.clone(), Value::String(v.to_owned())))
                    .collect();
                table.rows.push(Row { line, values });
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("{len} fields where the header has {expected_len}"),
                    csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
                    _ => e.to_string(),
                };
                errors.push(RowError::new(line, reason));
                if !matches!(
                    e.kind(),
                    csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                ) {
                    // Anything else (an I/O error) ends the file.
                    break;
                }
            }
        }
    }
    (table, errors)
}

fn read_jsonl(bytes: &[u8]) -> (Table, Vec<RowError>) {
    let mut errors = Vec::new();
    let mut table = Table::default();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(values)) => {
                for k in values.keys() {
                    if !table.columns.contains(k) {
                        table.columns.push(k.clone());
                    }
                }
                table.rows.push(Row { line, values });
            }
            Ok(other) => errors.push(RowError::new(
                line,
                format!(
                    "a line must hold one JSON object, not {}",
                    json_kind(&other)
                ),
            )),
            Err(e) => errors.push(RowError::new(line, format!("not valid JSON: {e}"))),
        }
    }
    (table, errors)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_bom_quotes_and_newlines_keeps_start_lines() {
        let file = "\u{feff}slug,title\na,\"x, \"\"y\"\"\"\nb,\"two\nlines\"\nc,🎉\n";
        let (t, errors) = read(file.as_bytes(), Format::Csv);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(t.columns, ["slug", "title"]);
        let lines: Vec<u64> = t.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 3, 5]);
        assert_eq!(t.rows[0].values["title"], "x, \"y\"");
        assert_eq!(t.rows[1].values["title"], "two\nlines");
        assert_eq!(t.rows[2].values["title"], "🎉");
    }

    #[test]
    fn csv_rows_of_the_wrong_width_are_named() {
        let (t, errors) = read(b"a,b\n1,2\n3\n4,5,6\n7,8\n", Format::Csv);
        assert_eq!(t.rows.len(), 2);
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4]);
    }

    #[test]
    fn jsonl_keeps_types_and_names_bad_lines() {
        let (t, errors) = read(
            b"{\"slug\":\"a\",\"n\":1}\n\n[1]\n{\"slug\":\"b\",\"tags\":[\"x\"]}\n{oops\n",
            Format::Jsonl,
        );
        assert_eq!(t.columns, ["n", "slug", "tags"]);
        assert_eq!(t.rows[0].values["n"], 1);
        assert_eq!(t.rows[1].line, 4);
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 5]);
    }
}

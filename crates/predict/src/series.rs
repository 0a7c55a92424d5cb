//! Reading load traces: the shared real data sets (Azure wide CSV, PlanetLab day rows), gzip or
//! plain, and NovaCron's own generated CSV (the same wide layout).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One series of utilisation samples (CPU %, 0–100) at 5-minute steps. Missing points are NaN.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Where it came from (a VM id or name).
    pub name: String,
    /// The samples.
    pub values: Vec<f64>,
}

/// A trace file that does not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file cannot be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line does not have the expected shape.
    #[error("{path}:{line}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Opens a file for reading lines, decompressing `.gz` files.
pub(crate) fn open(path: &Path) -> Result<Box<dyn BufRead>, ReadError> {
    let io = |source| ReadError::Io { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::new(reader)))
}

fn value(cell: &str) -> Option<f64> {
    let c = cell.trim();
    if c.is_empty() || c.eq_ignore_ascii_case("nan") || c.eq_ignore_ascii_case("na") {
        return Some(f64::NAN);
    }
    c.parse::<f64>().ok().filter(|v| v.is_nan() || (v.is_finite() && *v >= 0.0))
}

/// Seconds between samples.
pub const STEP_S: i64 = 300;

fn epoch_seconds(s: &str) -> Option<i64> {
    let s = s.trim().trim_matches('"');
    if let Ok(n) = s.parse::<f64>() {
        return n.is_finite().then_some(n as i64);
    }
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs() as i64)
}

/// Reads the **long** layout: header `series_id,timestamp,value`, timestamps in RFC 3339 or
/// epoch seconds, any order. Each series is laid on 5-minute steps from its first timestamp;
/// steps without a sample are missing, a step sampled twice keeps the later row.
fn read_long(name: &str, lines: impl Iterator<Item = std::io::Result<String>>) -> Result<Vec<Series>, ReadError> {
    let fmt = |line: usize, reason: String| ReadError::Format { path: name.to_owned(), line, reason };
    let mut by: std::collections::BTreeMap<String, Vec<(i64, f64)>> = std::collections::BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|source| ReadError::Io { path: name.to_owned(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 2;
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 3 {
            return Err(fmt(n, format!("{} cells, expected series_id,timestamp,value", cells.len())));
        }
        let ts = epoch_seconds(cells[1])
            .ok_or_else(|| fmt(n, format!("{:?} is not RFC 3339 or epoch seconds", cells[1])))?;
        let v = value(cells[2]).ok_or_else(|| fmt(n, format!("{:?} is not a non-negative number", cells[2])))?;
        by.entry(cells[0].trim().trim_matches('"').to_owned()).or_default().push((ts, v));
    }
    Ok(by
        .into_iter()
        .map(|(name, mut points)| {
            points.sort_by_key(|p| p.0);
            let first = points.first().map_or(0, |p| p.0);
            let last = points.last().map_or(0, |p| p.0);
            let steps = usize::try_from((last - first + STEP_S / 2) / STEP_S + 1).unwrap_or(0);
            let mut values = vec![f64::NAN; steps];
            for (ts, v) in points {
                let k = usize::try_from((ts - first + STEP_S / 2) / STEP_S).unwrap_or(0);
                if let Some(slot) = values.get_mut(k) {
                    *slot = v;
                }
            }
            Series { name, values }
        })
        .collect())
}

/// Writes series in the long layout (`series_id,timestamp,value`), the first step at `start`
/// epoch seconds; missing points are left out.
#[must_use]
pub fn to_long_csv(series: &[Series], start: i64) -> String {
    let mut out = String::from("series_id,timestamp,value\n");
    for s in series {
        for (t, v) in s.values.iter().enumerate() {
            if !v.is_nan() {
                out.push_str(&format!("{},{},{v}\n", s.name, start + t as i64 * STEP_S));
            }
        }
    }
    out
}

/// Reads a trace: **long** (header `series_id,timestamp,value`), **wide** (header
/// `step,<series>…`, one row per step — the Azure files and `novacron data generate`) or
/// **rows** (header `vm,t000,…`, one row per series — PlanetLab).
///
/// # Errors
/// The file's name and line when it cannot be read or a cell is not a non-negative number.
pub fn read_trace(path: &Path) -> Result<Vec<Series>, ReadError> {
    let name = path.display().to_string();
    let mut lines = open(path)?.lines();
    let fmt = |line: usize, reason: String| ReadError::Format { path: name.clone(), line, reason };
    let header = match lines.next() {
        Some(h) => h.map_err(|source| ReadError::Io { path: name.clone(), source })?,
        None => return Err(fmt(1, "empty file".into())),
    };
    let cols: Vec<String> = header.split(',').map(|c| c.trim().trim_matches('"').to_owned()).collect();
    if cols == ["series_id", "timestamp", "value"] {
        return read_long(&name, lines);
    }
    let rows_layout = cols.first().is_some_and(|c| c == "vm");
    if !rows_layout && cols.first().is_none_or(|c| c != "step") {
        return Err(fmt(
            1,
            format!("expected a header starting with `step` (wide) or `vm` (rows), got {:?}", cols.first()),
        ));
    }
    let mut out: Vec<Series> = if rows_layout {
        Vec::new()
    } else {
        cols[1..].iter().map(|c| Series { name: c.clone(), values: Vec::new() }).collect()
    };
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|source| ReadError::Io { path: name.clone(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 2;
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != cols.len() {
            return Err(fmt(n, format!("{} cells, the header has {}", cells.len(), cols.len())));
        }
        let parse = |c: &str| value(c).ok_or_else(|| fmt(n, format!("{c:?} is not a non-negative number")));
        if rows_layout {
            let values = cells[1..].iter().map(|c| parse(c)).collect::<Result<Vec<_>, _>>()?;
            out.push(Series { name: cells[0].trim_matches('"').to_owned(), values });
        } else {
            for (s, c) in out.iter_mut().zip(&cells[1..]) {
                s.values.push(parse(c)?);
            }
        }
    }
    Ok(out)
}

/// Writes series in the wide layout (`step,<names>…`); NaN is written as an empty cell.
#[must_use]
pub fn to_wide_csv(series: &[Series]) -> String {
    let mut out = String::from("step");
    for s in series {
        out.push(',');
        out.push_str(&s.name);
    }
    out.push('\n');
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    for t in 0..n {
        out.push_str(&t.to_string());
        for s in series {
            out.push(',');
            if let Some(v) = s.values.get(t).filter(|v| !v.is_nan()) {
                out.push_str(&format!("{v:.3}"));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_read_and_bad_cells_name_the_line() {
        let dir = std::env::temp_dir().join(format!("nc-series-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wide = dir.join("w.csv");
        std::fs::write(&wide, "step,a,b\n0,1.5,2\n1,,3\n").unwrap();
        let s = read_trace(&wide).unwrap();
        assert_eq!(s[0].name, "a");
        assert_eq!(s[1].values, [2.0, 3.0]);
        assert!(s[0].values[1].is_nan(), "an empty cell is a missing point");
        let rows = dir.join("r.csv");
        std::fs::write(&rows, "vm,t000,t001\nx,1,2\ny,3,4\n").unwrap();
        assert_eq!(read_trace(&rows).unwrap()[1].values, [3.0, 4.0]);
        std::fs::write(&rows, "vm,t000,t001\nx,1,-2\n").unwrap();
        let e = read_trace(&rows).unwrap_err().to_string();
        assert!(e.ends_with("r.csv:2: \"-2\" is not a non-negative number"), "{e}");
        std::fs::write(&rows, "time,a\n").unwrap();
        assert!(read_trace(&rows).unwrap_err().to_string().contains("expected a header"));
        let long = dir.join("l.csv");
        std::fs::write(
            &long,
            "series_id,timestamp,value\nb,600,3\na,2017-01-01T00:00:00Z,1\nb,0,1\na,2017-01-01T00:10:00Z,4\n",
        )
        .unwrap();
        let l = read_trace(&long).unwrap();
        assert_eq!(l[0].name, "a");
        assert_eq!(l[0].values.len(), 3);
        assert!(l[0].values[1].is_nan(), "00:05 has no sample");
        assert_eq!((l[0].values[0], l[0].values[2]), (1.0, 4.0));
        assert_eq!(l[1].values.len(), 3, "b: 0 s and 600 s");
        std::fs::write(&long, to_long_csv(&s, 0)).unwrap();
        let round = read_trace(&long).unwrap();
        assert_eq!(round[1].values, [2.0, 3.0]);
        std::fs::write(&long, "series_id,timestamp,value\na,yesterday,1\n").unwrap();
        assert!(
            read_trace(&long)
                .unwrap_err()
                .to_string()
                .ends_with("l.csv:2: \"yesterday\" is not RFC 3339 or epoch seconds")
        );
        let back = to_wide_csv(&s);
        std::fs::write(&wide, back).unwrap();
        assert_eq!(read_trace(&wide).unwrap()[1].values, [2.0, 3.0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

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

/// Reads a trace: **wide** (header `step,<series>…`, one row per step — the Azure files and
/// `novacron data generate`) or **rows** (header `vm,t000,…`, one row per series — PlanetLab).
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
        let back = to_wide_csv(&s);
        std::fs::write(&wide, back).unwrap();
        assert_eq!(read_trace(&wide).unwrap()[1].values, [2.0, 3.0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

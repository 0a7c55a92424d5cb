//! Reading policy documents: YAML (one or more documents separated by `---`) or JSON (one
//! document or an array), strictly — an unknown field is an error — with the file, line and
//! column of the first problem.

use novacron_types::policy::Policy;

/// A document that does not parse, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ParseError {
    /// The file (or the name given to the text).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses every policy document in `text`, read from `file`.
///
/// # Errors
/// The first document that does not parse, with its position.
pub fn parse_policies(file: &str, text: &str) -> Result<Vec<Policy>, ParseError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return parse_json(file, text);
    }
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        // Rules are written as one-key maps (`rule: {placement: …}`), as in JSON, not as
        // YAML tags.
        match serde_yaml::with::singleton_map_recursive::deserialize::<Policy, _>(doc) {
            Ok(p) => out.push(p),
            Err(e) => {
                let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
                // serde_yaml appends " at line L column C" to some messages; the position is
                // already in front.
                let msg = e.to_string();
                let message = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
                return Err(ParseError { file: file.to_owned(), line, column, message });
            }
        }
    }
    if out.is_empty() {
        return Err(ParseError { file: file.to_owned(), line: 1, column: 1, message: "no policy document".into() });
    }
    Ok(out)
}

fn parse_json(file: &str, text: &str) -> Result<Vec<Policy>, ParseError> {
    let err = |e: serde_json::Error| {
        let msg = e.to_string();
        let message = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
        ParseError { file: file.to_owned(), line: e.line().max(1), column: e.column().max(1), message }
    };
    if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Policy>>(text).map_err(err)
    } else {
        Ok(vec![serde_json::from_str::<Policy>(text).map_err(err)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_say_file_line_and_column() {
        let text = "name: web\nrule:\n  anti-affinity:\n    topology: zone\n    colour: red\n";
        let e = parse_policies("web.yaml", text).unwrap_err();
        assert_eq!((e.line, e.column), (5, 5), "{e}");
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(e.to_string().starts_with("web.yaml:5:5: "), "{e}");

        let e = parse_policies("p.yaml", "name: a\nrule:\n  teleport: {}\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("unknown variant `teleport`"), "{e}");

        let e = parse_policies("p.yaml", "name: a\npriority: high\nrule:\n  placement: {}\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 11), "{e}");
    }

    #[test]
    fn several_yaml_documents_and_json_forms_parse() {
        let text = "name: a\nrule:\n  placement:\n    require_labels: {zone: a}\n---\nname: b\nenforcement: soft\nrule:\n  affinity: {}\n";
        let p = parse_policies("two.yaml", text).unwrap();
        assert_eq!(p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let one = parse_policies("a.json", r#"{"name": "a", "rule": {"affinity": {}}}"#).unwrap();
        assert_eq!(one.len(), 1);
        let many = parse_policies(
            "m.json",
            r#"[{"name": "a", "rule": {"affinity": {}}}, {"name": "b", "rule": {"healing": {}}}]"#,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        let e =
            parse_policies("bad.json", "{\n  \"name\": \"a\",\n  \"rule\": {\"affinity\": {\"x\": 1}}\n}").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("unknown field `x`"), "{e}");
    }
}

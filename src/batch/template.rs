//! Prompt and key templates: literal text with `{column}` placeholders filled from a row, `{{`
//! and `}}` for literal braces. The rendered text is exactly what is sent (or used as the key):
//! no trimming, no other escapes.

use serde_json::Value;

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed '{{' at character {0} (write '{{{{' for a literal brace)")]
    Unclosed(usize),
    #[error("'}}' without '{{' at character {0} (write '}}}}' for a literal brace)")]
    StrayClose(usize),
    #[error("empty placeholder '{{}}' at character {0}")]
    Empty(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().enumerate().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|(_, n)| *n == '{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().is_some_and(|(_, n)| *n == '}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::StrayClose(i + 1)),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, '{')) | None => return Err(TemplateError::Unclosed(i + 1)),
                            Some((_, ch)) => name.push(ch),
                        }
                    }
                    if name.trim().is_empty() {
                        return Err(TemplateError::Empty(i + 1));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name));
                }
                other => literal.push(other),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template {
            source: text.to_owned(),
            parts,
        })
    }

    /// The template that is exactly one column's value.
    pub fn field(name: &str) -> Template {
        Template {
            source: format!("{{{name}}}"),
            parts: vec![Part::Field(name.to_owned())],
        }
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The columns the template names, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Field(f) = p
                && !seen.contains(&f.as_str())
            {
                seen.push(f);
            }
        }
        seen
    }

    /// Fills the placeholders from `row`; `Err(name)` for the first placeholder the row lacks.
    pub fn render(&self, row: &serde_json::Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match row.get(f) {
                    Some(v) => push_value(&mut out, v),
                    None => return Err(f.clone()),
                },
            }
        }
        Ok(out)
    }
}

/// A value as it reads in a prompt: strings as they are, null as nothing, anything else as
/// its JSON text.
pub fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Null => {}
        other => out.push_str(&other.to_string()),
    }
}

/// [`push_value`] into a new string.
pub fn value_text(v: &Value) -> String {
    let mut s = String::new();
    push_value(&mut s, v);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn placeholders_and_literal_braces() {
        let t = Template::parse(r#"Header for "{title}": {summary}. {{not a field}} {n}"#).unwrap();
        assert_eq!(t.fields(), ["title", "summary", "n"]);
        let r = row(&[
            ("title", Value::from("Ünïcode 🎉")),
            ("summary", Value::from("a, b\nc")),
            ("n", Value::from(3)),
        ]);
        assert_eq!(
            t.render(&r).unwrap(),
            "Header for \"Ünïcode 🎉\": a, b\nc. {not a field} 3"
        );
        assert_eq!(
            t.render(&row(&[("title", Value::from("x"))])),
            Err("summary".to_owned())
        );
    }

    #[test]
    fn malformed_templates_say_where() {
        assert_eq!(Template::parse("a {b"), Err(TemplateError::Unclosed(3)));
        assert_eq!(Template::parse("a } b"), Err(TemplateError::StrayClose(3)));
        assert_eq!(Template::parse("{ }"), Err(TemplateError::Empty(1)));
        assert_eq!(Template::parse("{a{b}"), Err(TemplateError::Unclosed(1)));
        assert!(Template::parse("no fields").unwrap().fields().is_empty());
    }
}

//! One error type for the library. Its [`Category`] says what went wrong (the spec's §9.3
//! categories plus oftool's own); its fields say where (file, tensor), what was expected and
//! found, and what to do about it (a hint).
//!
//! Exit codes follow the category: 2 for usage and I/O problems, 1 for everything a file's
//! content or a requested operation got wrong.

use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of problem an [`Error`] (or a `validate` finding) is.
///
/// The first group are the categories of `spec/oft-format.md` §9.3 and keep their identifiers;
/// the rest are oftool's own. New categories may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Category {
    /// Not a readable container: a safetensors file (or a `torch.save` archive) that is cut
    /// short, inconsistent or too large to hold.
    Container,
    /// A safetensors file that is not a `.oft` file.
    NotOft,
    /// Unknown MAJOR, malformed version, or an unimplemented `requires` feature.
    Version,
    /// Manifest JSON or schema error, including unknown closed-enum values.
    Manifest,
    /// Digest missing or mismatched.
    Digest,
    /// Tensor missing, unreferenced, misnamed, wrong dtype or wrong shape.
    Tensor,
    /// NaN or infinity stored or produced.
    NonFinite,
    /// Block partition inconsistent with the rotated dimension.
    Partition,
    /// Wiring constraints violated.
    Wiring,
    /// Stored `Q` outside the recorded constraint (a warning in `validate`).
    Constraint,
    /// A layer's target weight is not in the base.
    TargetMissing,
    /// A layer's target matches several base tensors.
    TargetAmbiguous,
    /// The target weight's shape or dtype does not fit the layer.
    TargetShape,
    /// The base is not the one the adapter was bound to.
    Binding,
    /// A foreign adapter that breaks its own layout's rules (inconsistent tensors or config).
    Malformed,
    /// Not an adapter layout oftool recognises.
    UnknownLayout,
    /// A recognised layout, feature or value that oftool does not handle.
    Unsupported,
    /// A conversion that would change (lossy) or cannot express (impossible) some layers.
    Conversion,
    /// A strength, inverse or composition that has no representation.
    Algebra,
    /// Reading or writing a file failed.
    Io,
    /// Bad command-line arguments or options.
    Usage,
}

impl Category {
    /// The identifier used in messages and JSON (`target-missing`, `io`, …).
    pub fn id(self) -> &'static str {
        match self {
            Category::Container => "container",
            Category::NotOft => "not-oft",
            Category::Version => "version",
            Category::Manifest => "manifest",
            Category::Digest => "digest",
            Category::Tensor => "tensor",
            Category::NonFinite => "non-finite",
            Category::Partition => "partition",
            Category::Wiring => "wiring",
            Category::Constraint => "constraint",
            Category::TargetMissing => "target-missing",
            Category::TargetAmbiguous => "target-ambiguous",
            Category::TargetShape => "target-shape",
            Category::Binding => "binding",
            Category::Malformed => "malformed",
            Category::UnknownLayout => "unknown-layout",
            Category::Unsupported => "unsupported",
            Category::Conversion => "conversion",
            Category::Algebra => "algebra",
            Category::Io => "io",
            Category::Usage => "usage",
        }
    }

    /// Exit status for the command line: 2 for usage and I/O problems, 1 for bad content.
    pub fn exit_code(self) -> u8 {
        match self {
            Category::Io | Category::Usage => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// An error a user can meet: a category, where it happened, and what to do.
///
/// Boxed, so that `Result<T, Error>` stays one pointer wide on the happy path.
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    category: Category,
    path: Option<PathBuf>,
    tensor: Option<String>,
    message: String,
    expected: Option<String>,
    found: Option<String>,
    hint: Option<String>,
    rule: Option<u8>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `category` with a message (lowercase, no final period).
    pub fn new(category: Category, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            category,
            path: None,
            tensor: None,
            message: message.into(),
            expected: None,
            found: None,
            hint: None,
            rule: None,
            source: None,
        }))
    }

    /// A failed read or write of `path`; the OS error is the message.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::new(Category::Io, source.to_string())
            .at(path)
            .caused_by_hidden(source)
    }

    /// A foreign adapter file that breaks its own layout's rules.
    pub fn format(path: &Path, detail: impl Into<String>) -> Self {
        Error::new(Category::Malformed, detail).at(path)
    }

    /// Something in `path` oftool recognises but does not handle.
    pub fn unsupported(path: &Path, detail: impl Into<String>) -> Self {
        Error::new(Category::Unsupported, detail).at(path)
    }

    /// Bad arguments.
    pub fn usage(message: impl Into<String>) -> Self {
        Error::new(Category::Usage, message)
    }

    /// The file this error is about.
    pub fn at(mut self, path: &Path) -> Self {
        self.0.path = Some(path.to_path_buf());
        self
    }

    /// Name `path` as the file unless the error already names one (e.g. a write error raised
    /// where only the writer, not the file name, was known).
    pub fn or_at(mut self, path: &Path) -> Self {
        if self.0.path.is_none() {
            self.0.path = Some(path.to_path_buf());
        }
        self
    }

    /// The tensor (or layer) this error is about.
    pub fn tensor(mut self, name: impl Into<String>) -> Self {
        self.0.tensor = Some(name.into());
        self
    }

    /// What was expected and what was found, as the user can check them.
    pub fn expected_found(mut self, expected: impl fmt::Display, found: impl fmt::Display) -> Self {
        self.0.expected = Some(expected.to_string());
        self.0.found = Some(found.to_string());
        self
    }

    /// What to do about it (one line, naming a flag where one helps).
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.0.hint = Some(hint.into());
        self
    }

    /// The rule of `spec/oft-format.md` §9.1 the file breaks (a `.oft` file's problems).
    pub fn rule(mut self, rule: u8) -> Self {
        self.0.rule = Some(rule);
        self
    }

    /// Keep `source` as the cause (shown by `Display` after the message).
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.message = format!("{}: {source}", self.0.message);
        self.0.source = Some(Box::new(source));
        self
    }

    /// Keep `source` for `source()` without repeating it (the message already says it).
    fn caused_by_hidden(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Box::new(source));
        self
    }

    /// What kind of problem this is.
    pub fn category(&self) -> Category {
        self.0.category
    }

    /// The file the problem is in, if one is known.
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }

    /// The tensor or layer the problem is about, if any.
    pub fn tensor_name(&self) -> Option<&str> {
        self.0.tensor.as_deref()
    }

    /// The message alone (no file, tensor or figures).
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The expected value, when the problem compares two.
    pub fn expected(&self) -> Option<&str> {
        self.0.expected.as_deref()
    }

    /// The value found, when the problem compares two.
    pub fn found(&self) -> Option<&str> {
        self.0.found.as_deref()
    }

    /// What to do about it, if oftool knows.
    pub fn hint_text(&self) -> Option<&str> {
        self.0.hint.as_deref()
    }

    /// The spec §9.1 rule a `.oft` file breaks, where one applies.
    pub fn spec_rule(&self) -> Option<u8> {
        self.0.rule
    }

    /// Exit status for the command line (see [`Category::exit_code`]).
    pub fn exit_code(&self) -> u8 {
        self.0.category.exit_code()
    }

    /// Whether a read or write failed (as opposed to bad content).
    pub fn is_io(&self) -> bool {
        self.0.category == Category::Io
    }

    /// The same error re-labelled (e.g. a generic check failing inside a bake is `target-shape`).
    pub fn recategorized(mut self, category: Category) -> Self {
        self.0.category = category;
        self
    }

    /// A JSON object for `--json` output: category, message and the fields that are set.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("category".into(), self.0.category.id().into());
        m.insert("message".into(), self.to_string().into());
        if let Some(p) = &self.0.path {
            m.insert("path".into(), p.display().to_string().into());
        }
        if let Some(r) = self.0.rule {
            m.insert("rule".into(), r.into());
        }
        for (k, v) in [
            ("tensor", &self.0.tensor),
            ("expected", &self.0.expected),
            ("found", &self.0.found),
            ("hint", &self.0.hint),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        }
        serde_json::Value::Object(m)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.0.path {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(t) = &self.0.tensor {
            write!(f, "`{t}`: ")?;
        }
        f.write_str(&self.0.message)?;
        match (&self.0.expected, &self.0.found) {
            (Some(e), Some(x)) => write!(f, " (expected {e}, found {x})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// `Result` with oftool's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_tensor_and_figures() {
        let e = Error::new(Category::TargetShape, "rotated axis does not fit")
            .at(Path::new("a.oft"))
            .tensor("unet.x.to_q")
            .expected_found(320, 640)
            .hint("pass --skip-missing");
        assert_eq!(
            e.to_string(),
            "a.oft: `unet.x.to_q`: rotated axis does not fit (expected 320, found 640)"
        );
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_json()["category"], "target-shape");
        assert_eq!(e.to_json()["hint"], "pass --skip-missing");
    }

    #[test]
    fn io_and_usage_exit_2() {
        let e = Error::io(
            Path::new("x"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.to_string(), "x: gone");
        assert_eq!(e.exit_code(), 2);
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(Error::usage("bad").exit_code(), 2);
    }
}

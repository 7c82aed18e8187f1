use std::fmt;
use std::path::PathBuf;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The file the problem was found in, when it is known (decoding errors); validation of
    /// the merged configuration has no single file.
    pub file: Option<PathBuf>,
    /// Dotted field path, e.g. `spec.hybrid.ssm.activationId` or `spec.kubelet.flags[2]`.
    pub path: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why configuration could not be loaded. Every variant maps to exit code 78 (EX_CONFIG).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file or the drop-in directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid YAML.
    #[error("{}: not valid YAML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// One or more fields are wrong.
    #[error("{}", display_fields(errors))]
    Invalid {
        /// Every problem found, in document order.
        errors: Vec<FieldError>,
    },
}

impl ConfigError {
    /// The field errors, if this is a field-level failure.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid { errors } => errors,
            _ => &[],
        }
    }
}

fn display_fields(errors: &[FieldError]) -> String {
    let mut out = format!(
        "invalid configuration ({} problem{}):",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        out.push_str("\n  ");
        out.push_str(&e.to_string());
    }
    out
}

//! A setting that failed validation.

/// A setting that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting} {value:?}: {problem}; {hint}")]
pub struct ConfigError {
    /// The command line flag, e.g. `--bypass-mark`.
    pub setting: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
    /// What to do about it.
    pub hint: &'static str,
}

impl ConfigError {
    pub(super) fn new(
        setting: &'static str,
        value: &str,
        problem: impl Into<String>,
        hint: &'static str,
    ) -> Self {
        ConfigError {
            setting,
            value: value.to_owned(),
            problem: problem.into(),
            hint,
        }
    }
}

//! The crate's one error type: a small matchable kind, a message that says
//! what went wrong and what to do, what it concerns (volume, replica,
//! offset) as fields rather than formatted into every message, and the
//! source. Modules keep their own `thiserror` enums and convert into this
//! at their boundary; `edge::csi` maps the kind to a gRPC code exactly once.
//!
//! `Display` is the error itself, without its source, so a reporter walking
//! `source()` does not print a cause twice; `report()` is the whole chain,
//! for the edges that show an error to a person (gRPC status messages,
//! Kubernetes events, the CLI, logs).

use std::fmt;

/// What kind of failure this is, decided where the error starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something we will never accept.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The name exists with incompatible attributes.
    AlreadyExists,
    /// Not enough capacity or failure domains.
    ResourceExhausted,
    /// The request is valid but the object is in the wrong state for it.
    FailedPrecondition,
    /// A size outside what the volume or class allows.
    OutOfRange,
    /// Another operation on the same object is in progress; retry.
    Aborted,
    /// A dependency is down; retry later.
    Unavailable,
    /// A bug or an unexpected failure of the machine.
    Internal,
}

/// What an error concerns, when it concerns one volume's data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub volume: Option<String>,
    pub replica: Option<usize>,
    pub offset: Option<u64>,
}

impl Subject {
    fn is_empty(&self) -> bool {
        self.volume.is_none() && self.replica.is_none() && self.offset.is_none()
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = &self.volume {
            parts.push(format!("volume {v}"));
        }
        if let Some(r) = self.replica {
            parts.push(format!("replica {r}"));
        }
        if let Some(o) = self.offset {
            parts.push(format!("offset {o}"));
        }
        f.write_str(&parts.join(", "))
    }
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub subject: Subject,
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            subject: Subject::default(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            subject: Subject::default(),
            source: Some(Box::new(source)),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An I/O failure of the machine, with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Internal, context, source)
    }

    /// The volume this concerns; an inner, more specific one is kept.
    pub fn volume(mut self, id: &str) -> Self {
        self.subject.volume.get_or_insert_with(|| id.to_string());
        self
    }

    /// The replica (index in its volume) this concerns.
    pub fn replica(mut self, index: usize) -> Self {
        self.subject.replica.get_or_insert(index);
        self
    }

    /// The byte offset in the volume or replica this concerns.
    pub fn at(mut self, offset: u64) -> Self {
        self.subject.offset.get_or_insert(offset);
        self
    }

    /// The error and every cause under it, for a person to read.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// `Error::report`: `what happened (volume …): cause: its cause`.
pub struct Report<'a>(&'a Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Adds what a failure concerns on the way up, where the callee did not
/// know it: `pool.open(name).for_volume(id)?`.
pub trait Context<T> {
    fn for_volume(self, id: &str) -> Result<T>;
    fn for_replica(self, index: usize) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn for_volume(self, id: &str) -> Result<T> {
        self.map_err(|e| e.volume(id))
    }

    fn for_replica(self, index: usize) -> Result<T> {
        self.map_err(|e| e.replica(index))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        // A message that already names its volume is not told it twice.
        let subject = Subject {
            volume: self
                .subject
                .volume
                .clone()
                .filter(|v| !self.message.contains(v.as_str())),
            ..self.subject.clone()
        };
        if !subject.is_empty() {
            write!(f, " ({subject})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_error_and_report_adds_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = Error::io("cannot open replica file", io)
            .replica(2)
            .volume("tv-1")
            .at(4096);
        assert_eq!(
            e.to_string(),
            "cannot open replica file (volume tv-1, replica 2, offset 4096)"
        );
        assert_eq!(
            e.report().to_string(),
            "cannot open replica file (volume tv-1, replica 2, offset 4096): No such file"
        );
        // The innermost subject wins; a message naming its volume is not
        // told it again.
        let e = Error::precondition("volume tv-2 is published at /p")
            .volume("tv-2")
            .volume("tv-3");
        assert_eq!(e.subject.volume.as_deref(), Some("tv-2"));
        assert_eq!(e.to_string(), "volume tv-2 is published at /p");
        let chained = Error::with_source(ErrorKind::Unavailable, "repair failed", e);
        assert_eq!(
            chained.report().to_string(),
            "repair failed: volume tv-2 is published at /p"
        );
        let r: Result<()> = Err(Error::internal("x"));
        assert_eq!(
            r.for_volume("tv-4").unwrap_err().to_string(),
            "x (volume tv-4)"
        );
    }
}

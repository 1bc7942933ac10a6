//! The crate's single error type. Plain Rust: the Python layer (`py/`) maps each variant to an
//! exception class, so messages here must stand on their own (name the file and the tensor).

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the native core. Variants are grouped by [`ErrorKind`],
/// which decides the Python exception class.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- operating system ----
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    // ---- malformed safetensors files ----
    #[error("{}: file is {len} bytes, too short for a safetensors header (need at least 8)", path.display())]
    FileTooSmall { path: PathBuf, len: u64 },

    #[error("{}: header length {header_len} exceeds the {limit}-byte limit", path.display())]
    HeaderTooLarge {
        path: PathBuf,
        header_len: u64,
        limit: u64,
    },

    #[error("{}: header length {header_len} runs past the end of the {file_len}-byte file", path.display())]
    HeaderBeyondFile {
        path: PathBuf,
        header_len: u64,
        file_len: u64,
    },

    #[error("{}: header is not valid UTF-8", path.display())]
    HeaderNotUtf8 { path: PathBuf },

    #[error("{}: header is not valid JSON: {message}", path.display())]
    HeaderNotJson { path: PathBuf, message: String },

    #[error("{}: header JSON is not an object", path.display())]
    HeaderNotObject { path: PathBuf },

    #[error("{}: the header names {name:?} twice", path.display())]
    DuplicateName { path: PathBuf, name: String },

    #[error("{}: __metadata__ must map strings to strings ({detail})", path.display())]
    InvalidMetadata { path: PathBuf, detail: String },

    #[error("{}: tensor {tensor:?}: header entry is not an object", path.display())]
    EntryNotObject { path: PathBuf, tensor: String },

    #[error("{}: tensor {tensor:?}: header entry has no {field:?}", path.display())]
    MissingField {
        path: PathBuf,
        tensor: String,
        field: &'static str,
    },

    #[error("{}: tensor {tensor:?}: header entry has {field:?} twice", path.display())]
    DuplicateField {
        path: PathBuf,
        tensor: String,
        field: &'static str,
    },

    #[error("{}: tensor {tensor:?}: {field:?} must be {expected}", path.display())]
    WrongFieldType {
        path: PathBuf,
        tensor: String,
        field: &'static str,
        expected: &'static str,
    },

    #[error("{}: tensor {tensor:?}: unknown dtype {code:?}", path.display())]
    UnknownDtypeInFile {
        path: PathBuf,
        tensor: String,
        code: String,
    },

    #[error(
        "{}: tensor {tensor:?}: shape {shape:?} is too large (its element count must stay below 2^63 and its byte size below 2^64)",
        path.display()
    )]
    ShapeOverflow {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
    },

    #[error(
        "{}: tensor {tensor:?}: shape {shape:?} needs {expected} bytes but data_offsets span {actual}",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        shape: Vec<u64>,
        expected: u64,
        actual: u64,
    },

    #[error("{}: tensor {tensor:?}: data_offsets end {end} is before start {start}", path.display())]
    OffsetsReversed {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
    },

    #[error(
        "{}: tensor {tensor:?}: data_offsets end {end} is beyond the {data_len}-byte data section",
        path.display()
    )]
    OffsetsOutOfBounds {
        path: PathBuf,
        tensor: String,
        end: u64,
        data_len: u64,
    },

    #[error("{}: tensors {first:?} and {second:?} have overlapping byte ranges", path.display())]
    Overlap {
        path: PathBuf,
        first: String,
        second: String,
    },

    // ---- inputs that change while they are read ----
    #[error(
        "input file {} changed during the merge ({detail}); what was read from it cannot be trusted",
        path.display()
    )]
    InputChanged { path: PathBuf, detail: String },

    // ---- lookups ----
    #[error("tensor {tensor:?} not found in {}", path.display())]
    TensorNotFound { path: PathBuf, tensor: String },

    // ---- bad arguments from the caller ----
    #[error("unknown dtype {0:?}")]
    UnknownDtype(String),

    #[error("dtype {0} is not supported by the CPU kernels (use F32, F16 or BF16)")]
    UnsupportedKernelDtype(&'static str),

    #[error("{what} has {actual} bytes, expected {expected}")]
    BufferLength {
        what: String,
        expected: usize,
        actual: usize,
    },

    #[error("output buffer of {len} bytes is not a whole number of {dtype} elements")]
    RaggedOutput { len: usize, dtype: &'static str },

    #[error("got {inputs} inputs, {dtypes} dtypes and {weights} weights; the counts must match")]
    ArgumentCount {
        inputs: usize,
        dtypes: usize,
        weights: usize,
    },

    #[error("{0}")]
    InvalidArgument(String),

    // ---- the shard writer ----
    #[error("tensor {0:?} appears twice in the output layout")]
    DuplicateTensor(String),

    #[error("tensor {name:?}: shape {shape:?} is too large (byte size overflows)")]
    LayoutOverflow { name: String, shape: Vec<u64> },

    #[error("tensor {0:?} is not part of the output layout")]
    UnknownTensor(String),

    #[error("tensor {0:?} was already written")]
    AlreadyWritten(String),

    #[error("tensor {name:?}: got {actual} bytes, the layout planned {expected}")]
    WriteSizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },

    #[error("{count} tensor(s) were never written, e.g. {}", format_names(.names))]
    NotWritten { count: usize, names: Vec<String> },

    #[error("the shard writer is already {0}")]
    WriterClosed(&'static str),
}

fn format_names(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What kind of mistake an [`Error`] is; the Python layer raises one exception class per kind
/// (`mergekitty.errors`: FileIOError, SafetensorsError, ModelFormatError, TensorNotFoundError,
/// InvalidArgumentError, ShardWriterError).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused a file operation.
    Io,
    /// A file is not a valid safetensors file.
    MalformedFile,
    /// An input file changed (shrank, was replaced or rewritten) after it was opened.
    InputChanged,
    /// A tensor is not where it was looked up.
    NotFound,
    /// The caller passed something the function cannot take.
    InvalidArgument,
    /// The shard writer was used against its layout.
    Output,
}

impl Error {
    /// Every variant is listed (no catch-all), so a new one has to choose its kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::FileTooSmall { .. }
            | Error::HeaderTooLarge { .. }
            | Error::HeaderBeyondFile { .. }
            | Error::HeaderNotUtf8 { .. }
            | Error::HeaderNotJson { .. }
            | Error::HeaderNotObject { .. }
            | Error::DuplicateName { .. }
            | Error::InvalidMetadata { .. }
            | Error::EntryNotObject { .. }
            | Error::MissingField { .. }
            | Error::DuplicateField { .. }
            | Error::WrongFieldType { .. }
            | Error::UnknownDtypeInFile { .. }
            | Error::ShapeOverflow { .. }
            | Error::SizeMismatch { .. }
            | Error::OffsetsReversed { .. }
            | Error::OffsetsOutOfBounds { .. }
            | Error::Overlap { .. } => ErrorKind::MalformedFile,
            Error::InputChanged { .. } => ErrorKind::InputChanged,
            Error::TensorNotFound { .. } => ErrorKind::NotFound,
            Error::UnknownDtype(_)
            | Error::UnsupportedKernelDtype(_)
            | Error::BufferLength { .. }
            | Error::RaggedOutput { .. }
            | Error::ArgumentCount { .. }
            | Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::DuplicateTensor(_)
            | Error::LayoutOverflow { .. }
            | Error::UnknownTensor(_)
            | Error::AlreadyWritten(_)
            | Error::WriteSizeMismatch { .. }
            | Error::NotWritten { .. }
            | Error::WriterClosed(_) => ErrorKind::Output,
        }
    }

    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// True for errors that mean "this file is not a valid safetensors file".
    pub fn is_malformed_file(&self) -> bool {
        self.kind() == ErrorKind::MalformedFile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_file_and_tensor() {
        let e = Error::SizeMismatch {
            path: "/m/a.safetensors".into(),
            tensor: "w".into(),
            shape: vec![2, 3],
            expected: 12,
            actual: 10,
        };
        let s = e.to_string();
        assert!(s.contains("/m/a.safetensors") && s.contains("\"w\"") && s.contains("12"));
        assert!(e.is_malformed_file());
    }

    #[test]
    fn io_keeps_source_and_path() {
        let e = Error::io("/nope", io::Error::from(io::ErrorKind::NotFound));
        assert!(e.to_string().starts_with("/nope: "));
        assert!(std::error::Error::source(&e).is_some());
        assert!(!e.is_malformed_file());
    }

    #[test]
    fn not_written_lists_names() {
        let e = Error::NotWritten {
            count: 7,
            names: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "7 tensor(s) were never written, e.g. \"a\", \"b\""
        );
    }
}

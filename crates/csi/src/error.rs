use tonic::{Code, Status};

/// Why a CSI call failed. [`CsiError::into_status`] is the one place these become gRPC
/// status codes, as the CSI specification mandates them.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Another operation on the volume is in flight.
    #[error("an operation on volume {volume_id} is already in progress; retry later")]
    Busy {
        /// The volume.
        volume_id: String,
    },
    /// The target already holds something incompatible.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call came in the wrong order or the node cannot serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The volume is not where the caller says.
    #[error("{0}")]
    NotFound(String),
    /// A mount helper did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The feature is not served by this plugin.
    #[error("{0}")]
    Unimplemented(String),
    /// Anything else on the host.
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// The gRPC code the CSI specification mandates for this error.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::Busy { .. } => Code::Aborted,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::Timeout(_) => Code::DeadlineExceeded,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// The gRPC status for this error (message human-readable, no details).
    pub fn into_status(self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

impl From<hybridlet_sys::mount::MountError> for CsiError {
    fn from(e: hybridlet_sys::mount::MountError) -> Self {
        match e {
            hybridlet_sys::mount::MountError::Timeout { .. } => CsiError::Timeout(e.to_string()),
            other => CsiError::Internal(other.to_string()),
        }
    }
}

//! What a service says went wrong, in the domain's words; the HTTP edge maps it to a status
//! and the contract's body in one place (`impl From<services::Error> for ApiError`).

use crate::services::state_machine::MoveError;
use crate::validation::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    /// The principal may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the state of things (a forbidden move, a taken trace id).
    #[error("{0}")]
    Conflict(String),
    /// The input breaks a rule; each entry names its field.
    #[error("invalid input")]
    Invalid(Vec<FieldError>),
    /// The service refuses work for now (an emergency stop).
    #[error("{0}")]
    Unavailable(String),
    /// A droplet could not be reached or refused what was relayed to it.
    #[error("{0}")]
    Upstream(String),
    /// Too much of something is waiting (a key past its `max_queued`): retry later.
    #[error("{detail}")]
    Backpressure {
        detail: String,
        retry_after_seconds: u64,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Error::Forbidden(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }
    /// A single-field rule broken, located in the request.
    pub fn invalid(loc: &[&str], msg: impl Into<String>, kind: &str) -> Self {
        Error::Invalid(vec![FieldError::new(loc, msg, kind)])
    }
}

impl From<MoveError> for Error {
    fn from(e: MoveError) -> Self {
        match e {
            MoveError::NotFound(id) => Error::not_found(format!("Task {id} not found")),
            MoveError::NotYours(id) => {
                Error::forbidden(format!("Task {id} is not assigned to this droplet"))
            }
            e @ (MoveError::Invalid(..) | MoveError::StaleAttempt { .. }) => {
                Error::conflict(e.to_string())
            }
            MoveError::Database(e) => Error::Database(e),
        }
    }
}

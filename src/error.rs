//! The one error type of the server: every failure a client can see maps, in this file and
//! nowhere else, to a protocol error code and an HTTP status. Internal details (database
//! messages, I/O errors) are logged where they happen and never sent to a client.

use crate::protocol::ErrorCode;
use crate::store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotMember(String),
    #[error("{0}")]
    Muted(String),
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    /// Something went wrong on our side; the text is for logs only.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::NotMember(_) => ErrorCode::NotMember,
            Self::Muted(_) => ErrorCode::Muted,
            Self::RateLimited(_) => ErrorCode::RateLimited,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The text a client sees: the reason for client errors, a fixed line for internal ones.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal server error".to_owned(),
            other => other.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::NotMember(_) | Self::Muted(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(msg.into())
    }

    /// The error a code names, carrying `message` (an error answered by another node, whose
    /// message is already the public one).
    pub fn from_code(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::BadRequest => Self::BadRequest(message),
            ErrorCode::Unauthorized => Self::Unauthorized(message),
            ErrorCode::Forbidden => Self::Forbidden(message),
            ErrorCode::NotFound => Self::NotFound(message),
            ErrorCode::NotMember => Self::NotMember(message),
            ErrorCode::Muted => Self::Muted(message),
            ErrorCode::RateLimited => Self::RateLimited(message),
            ErrorCode::TooLarge => Self::TooLarge(message),
            ErrorCode::Conflict => Self::Conflict(message),
            ErrorCode::Unavailable => Self::Unavailable(message),
            ErrorCode::Internal => Self::Internal(message),
        }
    }
}

/// The JSON body of an HTTP error: `{"code","message"}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StoreError::Conflict(what) => Self::Conflict(what),
            StoreError::Forbidden(what) => Self::Forbidden(what),
            StoreError::BadRequest(what) => Self::BadRequest(what),
            StoreError::TooLarge(what) => Self::TooLarge(what),
            StoreError::Closed => Self::Unavailable("server is shutting down".into()),
            StoreError::Busy(why) => Self::Unavailable(why),
            other => {
                tracing::error!(error = %other, "store failure");
                Self::Internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code(),
            message: self.public_message(),
        };
        (self.status(), axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_rebuilt_from_its_code_keeps_code_and_message() {
        let errors = [
            Error::BadRequest("a".into()),
            Error::Unauthorized("b".into()),
            Error::Forbidden("c".into()),
            Error::NotFound("d".into()),
            Error::NotMember("e".into()),
            Error::Muted("f".into()),
            Error::RateLimited("g".into()),
            Error::TooLarge("h".into()),
            Error::Conflict("i".into()),
            Error::Unavailable("j".into()),
            Error::Internal("k".into()),
        ];
        for e in errors {
            let back = Error::from_code(e.code(), e.public_message());
            assert_eq!(back.code(), e.code());
            assert_eq!(back.public_message(), e.public_message());
        }
    }
}

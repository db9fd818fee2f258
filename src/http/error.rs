//! API errors: one type, one `match` from library errors to status codes, one JSON shape
//! `{"error": {"code", "message"}}`. 4xx are logged at debug level, 5xx as errors.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::dto::{ErrorBody, ErrorDetail};
use crate::Error;

/// An error answer: status, stable code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", message)
    }

    pub fn not_ready() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no index generation is loaded yet; see GET /readyz",
        )
    }

    pub fn item_not_found(id: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "item_not_found", format!("no item with id {id:?} in the live generation"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<Error> for ApiError {
    /// The one place library errors become HTTP statuses.
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            Error::InvalidArgument { .. } => (S::BAD_REQUEST, "invalid_parameter"),
            Error::UnsupportedImageFormat { .. } => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_format"),
            Error::ImageDecode { .. } => (S::UNPROCESSABLE_ENTITY, "image_decode_failed"),
            Error::ImageTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "image_too_large"),
            Error::ImageTooManyPixels { .. } => (S::PAYLOAD_TOO_LARGE, "image_too_many_pixels"),
            Error::WrongVectorDimension { .. } => (S::BAD_REQUEST, "wrong_vector_dimension"),
            Error::NoLiveGeneration { .. } | Error::MilvusCollection { .. } => (S::SERVICE_UNAVAILABLE, "not_ready"),
            // The index backend (Milvus) is down, slow or failing: retry, never a 500.
            Error::MilvusUnavailable { .. } => (S::SERVICE_UNAVAILABLE, "backend_unavailable"),
            Error::Milvus { .. } => (S::SERVICE_UNAVAILABLE, "backend_error"),
            Error::ModelMismatch { .. } | Error::IndexCorrupt { .. } => (S::CONFLICT, "reload_refused"),
            _ => (S::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, code = self.code, message = %self.message, "request refused");
        }
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if retry {
            // A hint for clients and load balancers: the condition is expected to pass.
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_map_to_client_errors_for_bad_input() {
        let cases = [
            (Error::ImageDecode { reason: "x".into() }, 422),
            (Error::UnsupportedImageFormat { format: "image/gif".into() }, 415),
            (Error::ImageTooLarge { bytes: 2, limit: 1 }, 413),
            (Error::InvalidArgument { name: "k", reason: "x".into() }, 400),
            (Error::HttpServe { reason: "x".into() }, 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status.as_u16(), status);
        }
    }
}

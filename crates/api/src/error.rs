//! What a request can fail with, and how it is answered: a status and a
//! JSON body `{"error": "<what and how to fix it>", "status": N, …}`.

use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metrics::counter;
use serde_json::{Value, json};
use vidpulse_query::QueryError;

use crate::metrics as m;

/// A request that cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no such metric, leaderboard or route; `names` lists what exists
    /// under `key` (e.g. `"metrics": […]`).
    #[error("{message}")]
    NotFound {
        message: String,
        key: &'static str,
        names: Vec<String>,
    },
    /// 400: the request is malformed; the message says which part and why.
    #[error("{0}")]
    BadRequest(String),
    /// 503: too many requests at once; retry shortly.
    #[error("{0}")]
    Busy(String),
    /// 503: a backend (ClickHouse, Redis, Kafka) does not answer, or the
    /// aggregator has not created its tables yet.
    #[error("{0}")]
    Unavailable(String),
    /// 502: a backend refused the query.
    #[error("{0}")]
    Backend(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Busy(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Backend(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut v = json!({ "error": self.to_string(), "status": self.status().as_u16() });
        if let ApiError::NotFound { key, names, .. } = self {
            v[*key] = json!(names);
        }
        v
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if matches!(self, ApiError::Busy(_) | ApiError::Unavailable(_)) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("2"),
            );
        }
        resp
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            // The aggregator's messages speak of the CLI's `--where k=v`;
            // here a filter is the query parameter `k=v`.
            QueryError::Usage(msg) => ApiError::BadRequest(msg.replace("--where ", "filter ")),
            QueryError::ClickHouse(ch) => {
                counter!(m::BACKEND_ERRORS, "backend" => "clickhouse").increment(1);
                // Code 60 / 81: the table or database is not there (yet).
                if ch.message.contains("Code: 60,") || ch.message.contains("Code: 81,") {
                    ApiError::Unavailable(format!(
                        "the metric's ClickHouse table does not exist yet: start vidpulse-aggregator with the same spec, --topic-prefix and --clickhouse-database (it creates its tables). {}",
                        ch.message
                    ))
                } else if ch.retriable {
                    ApiError::Unavailable(format!("ClickHouse unavailable: {}", ch.message))
                } else {
                    ApiError::Backend(format!("ClickHouse refused the query: {}", ch.message))
                }
            }
            QueryError::Redis(r) => {
                counter!(m::BACKEND_ERRORS, "backend" => "redis").increment(1);
                ApiError::Unavailable(format!("Redis unavailable: {r}"))
            }
        }
    }
}

/// Runs a backend call with a deadline.
pub async fn deadline<T, E>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => {
            counter!(m::BACKEND_ERRORS, "backend" => "timeout").increment(1);
            Err(ApiError::Unavailable(format!(
                "{what} did not answer within {} (--query-timeout)",
                humantime::format_duration(limit)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_lists_the_names() {
        let e = ApiError::NotFound {
            message: "no metric \"x\"".into(),
            key: "metrics",
            names: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let b = e.body();
        assert_eq!(b["metrics"], json!(["a", "b"]));
        assert_eq!(b["status"], json!(404));
    }

    #[test]
    fn usage_errors_speak_of_query_parameters() {
        let e: ApiError =
            QueryError::Usage("--where grade: \"x\" is not a whole number".into()).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.to_string(), "filter grade: \"x\" is not a whole number");
    }
}

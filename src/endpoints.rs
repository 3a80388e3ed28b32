//! The gateway's own endpoints (SPEC §5): never proxied, never rate limited.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::HttpResponse;

use crate::actors::registry::GetHealthReport;
use crate::error::GatewayError;
use crate::worker::Snapshot;

fn only_get(method: &Method) -> Result<(), GatewayError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, HEAD"),
        })
    }
}

/// `GET /health`: always 200 while the gateway runs; `status` tells the state.
pub async fn health(method: &Method, ctx: &Snapshot) -> Result<HttpResponse, GatewayError> {
    only_get(method)?;
    let report = ctx
        .registry
        .send(GetHealthReport)
        .await
        .map_err(|err| GatewayError::Internal(format!("registry unavailable: {err}")))?;
    let internal = |err: serde_json::Error| GatewayError::Internal(err.to_string());
    let body = match ctx.verifier.as_ref().and_then(|verifier| verifier.jwks()) {
        None => serde_json::to_string(&report).map_err(internal)?,
        // SPEC §11: the provider's key set, with `auth.jwks_url`.
        Some(keys) => {
            let mut report = serde_json::to_value(&report).map_err(internal)?;
            if let Some(fields) = report.as_object_mut() {
                fields.insert(
                    "auth".to_owned(),
                    serde_json::to_value(keys.health()).map_err(internal)?,
                );
            }
            serde_json::to_string(&report).map_err(internal)?
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("application/json")))
        .body(body))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(method: &Method) -> Result<HttpResponse, GatewayError> {
    only_get(method)?;
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ))
        .body(crate::metrics::render()))
}

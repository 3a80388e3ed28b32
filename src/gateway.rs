//! The immutable view of the configuration that requests read: services and
//! their instances, the route table and the limits, all parsed once at
//! start-up into the types the hot path needs (URIs, header values, CIDRs).
//! Mutable state (health, cursors) lives in the actors.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderValue;
use actix_web::http::uri::{Authority, Scheme};
use actix_web::http::Method;
use ipnet::IpNet;

use crate::routing::{Route, RouteTable};
use crate::settings::Settings;

/// One upstream instance of a service.
#[derive(Debug)]
pub struct Instance {
    /// The URL as configured, shown by `/health`.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path of the instance URL without its trailing slash, prepended to
    /// forwarded paths (usually empty).
    pub base_path: String,
    /// `Host` sent upstream (changeOrigin).
    pub host: HeaderValue,
}

#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub instances: Vec<Instance>,
    pub health_path: String,
}

/// Everything a request needs to know that never changes while running.
#[derive(Debug)]
pub struct Gateway {
    pub services: Vec<Service>,
    pub routes: RouteTable,
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
}

impl Gateway {
    /// Compiles validated settings; errors here mean validation missed a case.
    pub fn from_settings(settings: &Settings) -> Result<Self, String> {
        let mut services = Vec::with_capacity(settings.services.len());
        for (name, service) in &settings.services {
            let instances = service
                .instances
                .iter()
                .map(|url| {
                    Instance::parse(url)
                        .map_err(|err| format!("services.{name}.instances: {url:?}: {err}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            services.push(Service {
                name: name.as_str().into(),
                instances,
                health_path: service.health_path.clone(),
            });
        }
        let mut routes = Vec::with_capacity(settings.routes.len());
        for (name, route) in &settings.routes {
            let service = services
                .iter()
                .position(|service| *service.name == *route.service)
                .ok_or_else(|| {
                    format!(
                        "routes.{name}.service: no service named {:?}",
                        route.service
                    )
                })?;
            let methods = if route.methods.is_empty() {
                None
            } else {
                let parsed = route
                    .methods
                    .iter()
                    .map(|method| Method::from_bytes(method.to_ascii_uppercase().as_bytes()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| format!("routes.{name}.methods: {err}"))?;
                Some(parsed)
            };
            routes.push(Route {
                name: name.as_str().into(),
                prefix: route.prefix.clone(),
                service,
                auth: route.needs_auth(),
                roles: route.roles.clone(),
                methods,
                strip_prefix: route.strip_prefix,
                rate_limit: route.rate_limit.clone(),
            });
        }
        Ok(Self {
            services,
            routes: RouteTable::new(routes),
            trusted_proxies: settings.server.trusted_proxies.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            max_header_bytes: settings.server.max_header_bytes,
            request_timeout: Duration::from_millis(settings.upstream.request_timeout_ms),
        })
    }

    pub fn is_trusted_proxy(&self, address: std::net::IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|net| net.contains(&address))
    }
}

impl Instance {
    fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|err| err.to_string())?;
        let scheme = Scheme::try_from(url.scheme()).map_err(|err| err.to_string())?;
        let host = url.host_str().ok_or("a host is required")?;
        let authority_text = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authority =
            Authority::try_from(authority_text.as_str()).map_err(|err| err.to_string())?;
        Ok(Self {
            url: raw.to_owned(),
            scheme,
            host: HeaderValue::from_str(&authority_text).map_err(|err| err.to_string())?,
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
        })
    }
}

//! The immutable view of the configuration that requests read: services and
//! their instances, the route table and the limits, all parsed once at
//! start-up into the types the hot path needs (URIs, header values, CIDRs).
//! Mutable state (health, cursors) lives in the actors.
//!
//! [`compile`] is the one step from validated settings to everything serving
//! needs: the gateway and the token verifier. `serve`, `check-config` and
//! every reload call it, so what one accepts the others do.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderValue;
use actix_web::http::uri::{Authority, Scheme};
use ipnet::IpNet;

use crate::auth::Verifier;
use crate::cors::CorsPolicy;
use crate::ratelimit::Policy;
use crate::routing::{parse_method, HostPattern, Route, RouteTable};
use crate::settings::{PolicyKey, RateLimitBackend, Settings};

/// What serving needs from the settings, built by [`compile`].
pub struct Runtime {
    pub gateway: Arc<Gateway>,
    /// `None` when no route needs auth: keys are parsed only when used.
    pub verifier: Option<Arc<Verifier>>,
    /// The TLS listener's certificate and key, read from their files;
    /// `None` without a TLS listener.
    pub certificate: Option<Arc<rustls::sign::CertifiedKey>>,
}

/// Compiles validated settings into a [`Runtime`]; every problem names its
/// key.
pub fn compile(settings: &Settings) -> Result<Runtime, Vec<String>> {
    let mut problems = Vec::new();
    let gateway = Gateway::from_settings(settings)
        .map_err(|problem| problems.push(problem))
        .ok();
    let needs_auth = settings.routes.values().any(|route| route.needs_auth());
    let verifier = needs_auth
        .then(|| {
            Verifier::new(&settings.auth)
                .map_err(|err| problems.push(err.to_string()))
                .ok()
        })
        .flatten();
    let certificate = match settings.server.tls.listen {
        Some(_) => crate::tls::load_certified_key(&settings.server.tls)
            .map_err(|found| problems.extend(found))
            .ok(),
        None => None,
    };
    if let (Some(gateway), RateLimitBackend::Redis) = (&gateway, settings.rate_limit.backend) {
        // What building a worker's limiter would refuse (an unparsable URL),
        // refused at start-up and reload instead.
        let roots = gateway.redis_roots.as_deref();
        if let Err(err) = crate::ratelimit::RateLimiter::new(&settings.rate_limit, roots, &Default::default()) {
            problems.push(err);
        }
    }
    match gateway {
        Some(gateway) if problems.is_empty() => Ok(Runtime {
            gateway: Arc::new(gateway),
            verifier: verifier.map(Arc::new),
            certificate,
        }),
        _ => Err(problems),
    }
}

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
    /// Every rate-limit policy; routes and `global` refer to them by their
    /// index here.
    pub policies: Vec<Policy>,
    pub global_policy: Option<usize>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    /// `None`: an upstream body may pause for ever.
    pub body_idle_timeout: Option<Duration>,
    /// Some route keeps `%2F` encoded, so a path refused for one is looked
    /// up again before the 400.
    pub any_route_allows_encoded_slash: bool,
    /// Some route has `security_headers = false`, so responses are checked
    /// for their route before the headers go on.
    pub any_route_drops_security_headers: bool,
    /// Preflights are looked for only when some route answers CORS.
    pub any_route_has_cors: bool,
    /// TLS for `https://` instances (proxying and probes).
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// The trust anchors `rediss://` is verified against, read with the
    /// rest of the configuration (see [`crate::tls::redis_root_certificates`]).
    pub redis_roots: Option<Arc<[u8]>>,
}

impl Gateway {
    /// Compiles validated settings; errors here mean validation missed a case.
    pub fn from_settings(settings: &Settings) -> Result<Self, String> {
        let mut services = Vec::with_capacity(settings.services.len());
        for (name, service) in &settings.services {
            let instances = service
                .instances
                .iter()
                .map(|url| Instance::parse(url).map_err(|err| format!("services.{name}.instances: {url:?}: {err}")))
                .collect::<Result<Vec<_>, _>>()?;
            services.push(Service {
                name: name.as_str().into(),
                instances,
                health_path: service.health_path.clone(),
            });
        }
        let policy_names: Vec<&String> = settings.rate_limit.policies.keys().collect();
        let policy_index = |name: &str| policy_names.iter().position(|known| *known == name);
        let policies: Vec<Policy> = settings
            .rate_limit
            .policies
            .iter()
            .map(|(name, policy)| {
                Policy::new(name, policy.window_s, policy.max, policy.key, &policy.message).counted_by(policy.algorithm)
            })
            .collect();
        let global_policy = match settings.rate_limit.global.as_str() {
            "" => None,
            name => Some(policy_index(name).ok_or_else(|| format!("rate_limit.global: no policy named {name:?}"))?),
        };
        let mut routes = Vec::with_capacity(settings.routes.len());
        for (name, route) in &settings.routes {
            let service = services
                .iter()
                .position(|service| *service.name == *route.service)
                .ok_or_else(|| format!("routes.{name}.service: no service named {:?}", route.service))?;
            let methods = if route.methods.is_empty() {
                None
            } else {
                let parsed = route
                    .methods
                    .iter()
                    .map(|method| {
                        parse_method(method)
                            .ok_or_else(|| format!("routes.{name}.methods: {method:?} is not an HTTP method"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(parsed)
            };
            routes.push(Route {
                name: name.as_str().into(),
                prefix: route.prefix.clone(),
                service,
                auth: route.needs_auth(),
                roles: route.roles.clone(),
                strip_prefix: route.strip_prefix,
                preserve_host: route.preserve_host,
                allow_encoded_slash: route.allow_encoded_slash,
                security_headers: route.security_headers,
                rate_limit: match &route.rate_limit {
                    None => None,
                    Some(policy) => Some(
                        policy_index(policy)
                            .ok_or_else(|| format!("routes.{name}.rate_limit: no policy named {policy:?}"))?,
                    ),
                },
                hosts: route
                    .hosts
                    .iter()
                    .map(|host| {
                        HostPattern::parse(host).map_err(|reason| format!("routes.{name}.hosts: {host:?} {reason}"))
                    })
                    .collect::<Result<_, _>>()?,
                websocket: route.websocket,
                request_timeout: match route.timeout_ms {
                    0 => Duration::from_millis(settings.upstream.request_timeout_ms),
                    ms => Duration::from_millis(ms),
                },
                cors: route
                    .cors
                    .as_ref()
                    .map(|cors| {
                        CorsPolicy::compile(cors, methods.as_deref())
                            .map_err(|reason| format!("routes.{name}.{reason}"))
                    })
                    .transpose()?,
                methods,
            });
        }
        let any_route_allows_encoded_slash = routes.iter().any(|route| route.allow_encoded_slash);
        let any_route_drops_security_headers = routes.iter().any(|route| !route.security_headers);
        let any_route_has_cors = routes.iter().any(|route| route.cors.is_some());
        Ok(Self {
            services,
            routes: RouteTable::new(routes),
            policies,
            global_policy,
            trusted_proxies: settings.server.trusted_proxies.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            max_header_bytes: settings.server.max_header_bytes,
            body_idle_timeout: match settings.upstream.body_idle_timeout_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            any_route_allows_encoded_slash,
            any_route_drops_security_headers,
            any_route_has_cors,
            upstream_tls: crate::tls::upstream_client_config(&settings.upstream)?,
            redis_roots: match settings.rate_limit.backend {
                RateLimitBackend::Redis => crate::tls::redis_root_certificates(&settings.upstream)?.map(Arc::from),
                RateLimitBackend::Memory => None,
            },
        })
    }

    pub fn is_trusted_proxy(&self, address: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&address))
    }

    /// The policies counted for a request at one pipeline point: the global
    /// policy and the route's own, those keyed by `key`.
    /// A route naming the global policy counts each request once.
    pub fn policies_for(&self, route_policy: Option<usize>, key: PolicyKey) -> Vec<usize> {
        let route_policy = route_policy.filter(|&index| Some(index) != self.global_policy);
        self.global_policy
            .into_iter()
            .chain(route_policy)
            .filter(|&index| self.policies[index].key == key)
            .collect()
    }

    /// The client address of SPEC §4: the TCP peer, or, when the peer is a
    /// trusted proxy, the right-most `X-Forwarded-For` entry that is not
    /// itself trusted. `forwarded_for` holds the entries left to right, `None`
    /// for one that is not an address: the walk stops there and keys on the
    /// last trusted hop, so a client cannot slip its own choice past a proxy
    /// that wrote something unexpected.
    pub fn client_address(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = Option<IpAddr>>,
    ) -> IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded_for.rev() {
            let Some(hop) = hop else { break };
            client = hop;
            if !self.is_trusted_proxy(hop) {
                break;
            }
        }
        client
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
        let authority = Authority::try_from(authority_text.as_str()).map_err(|err| err.to_string())?;
        Ok(Self {
            url: raw.to_owned(),
            scheme,
            host: HeaderValue::from_str(&authority_text).map_err(|err| err.to_string())?,
            authority,
            base_path: url.path().trim_end_matches('/').to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway_trusting(cidrs: &[&str]) -> Gateway {
        let mut settings = Settings::default();
        settings.server.trusted_proxies = cidrs.iter().map(|cidr| cidr.parse().unwrap()).collect();
        Gateway::from_settings(&settings).unwrap()
    }

    fn address(gateway: &Gateway, peer: &str, forwarded_for: &[Option<&str>]) -> String {
        let hops = forwarded_for.iter().map(|hop| hop.map(|ip| ip.parse().unwrap()));
        gateway.client_address(peer.parse().unwrap(), hops).to_string()
    }

    #[test]
    fn the_client_address_is_the_right_most_untrusted_hop_behind_trusted_proxies() {
        let gateway = gateway_trusting(&["10.0.0.0/8"]);
        assert_eq!(
            address(&gateway, "203.0.113.9", &[Some("1.2.3.4")]),
            "203.0.113.9",
            "untrusted peer"
        );
        assert_eq!(
            address(&gateway, "10.0.0.1", &[Some("1.2.3.4"), Some("5.6.7.8")]),
            "5.6.7.8"
        );
        assert_eq!(
            address(&gateway, "10.0.0.1", &[Some("1.2.3.4"), Some("10.0.0.2")]),
            "1.2.3.4"
        );
        assert_eq!(
            address(&gateway, "10.0.0.1", &[Some("10.0.0.3"), Some("10.0.0.2")]),
            "10.0.0.3"
        );
        assert_eq!(address(&gateway, "10.0.0.1", &[]), "10.0.0.1");
        assert_eq!(
            address(&gateway, "10.0.0.1", &[Some("1.2.3.4"), None]),
            "10.0.0.1",
            "stops at garbage"
        );
        assert_eq!(
            address(&gateway, "10.0.0.1", &[Some("1.2.3.4"), None, Some("10.0.0.2")]),
            "10.0.0.2"
        );
    }
}

//! The actors that own the gateway's mutable state (SPEC §6).
//!
//! - [`registry::RegistryActor`]: services, instances and their health.
//! - [`health::HealthChecker`]: periodic active probes, reported to the registry.
//! - [`balancer::BalancerActor`]: round-robin targets over the healthy
//!   instances; one per worker, so picking a target never crosses threads.

pub mod balancer;
pub mod health;
pub mod registry;

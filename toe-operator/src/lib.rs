//! TOE's operator. Pure decisions (admission, target selection, blast radius) live in their own
//! modules and are tested without an API server; the controller applies them.

pub mod admission;
pub mod certs;
pub mod controller;
pub mod ephemeral;
pub mod image_tools;
pub mod lease;
pub mod metrics;
pub mod processing;
pub use toe_common::api::rbac;
pub mod reports;
pub mod selection;
pub mod shutdown;
pub mod webhook;

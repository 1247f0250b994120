//! TOE's processing of run artifacts: read every capture of the selected runs from the object
//! store ([`capture`]), merge their profiles ([`toe_artifacts::folded`], [`pprof`]), find root causes with the
//! built-in rules ([`rules`]) and optionally a language model ([`model`]), and render one
//! self-contained HTML report ([`html`]). Everything here is a pure function of the captures,
//! except reading the store and calling the model; the operator schedules it and the CLI runs it
//! locally.

pub mod capture;
pub mod html;
pub mod merge;
pub mod model;
pub mod pprof;
pub mod process;
pub mod rules;
pub mod store;

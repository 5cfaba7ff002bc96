//! guardian: screens search queries with a small multilingual encoder and multi-task heads
//! (safe/unsafe plus ten harm categories), applies a threshold policy, and writes a safety
//! response in the query's language for unsafe ones.

pub mod bench;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod event;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod respond;
pub mod screen;
pub mod serve;
pub mod taxonomy;
pub mod train;
pub mod util;

pub use error::{Error, Result};

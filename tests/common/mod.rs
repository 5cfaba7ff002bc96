//! Shared by the integration tests: the model home and the release binary.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod kafka;

/// The model cache the tests use: GUARDIAN_HOME, else the default. `.ci/run` fetches into it.
pub fn home() -> PathBuf {
    std::env::var_os("GUARDIAN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(guardian::model::fetch::default_home)
}

pub fn spec(weights: guardian::model::WeightFormat) -> guardian::model::ModelSpec {
    guardian::model::ModelSpec {
        home: home(),
        backbone: guardian::model::Backbone::E5Small,
        weights,
        max_tokens: 128,
        device: "cpu".into(),
        heads: None,
        second_opinion: None,
    }
}

/// The `guardian` binary built with this test (same profile).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_guardian"))
}

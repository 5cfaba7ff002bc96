//! Device choice: `auto` (the first CUDA GPU when built with the `cuda` feature and one is
//! present, else the CPU), `cpu`, or `cuda:N`.

use candle_core::Device;

use crate::error::{Error, Result};

/// The forms `select` accepts, checked without touching any device (for config validation).
pub fn parse_spec(spec: &str) -> std::result::Result<(), String> {
    match spec.trim() {
        "cpu" | "auto" => Ok(()),
        s if s
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok()) =>
        {
            Ok(())
        }
        s => Err(format!("{s:?} is not one of auto, cpu, cuda:N")),
    }
}

pub fn select(spec: &str) -> Result<Device> {
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        s => {
            let Some(n) = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                return Err(Error::Config(format!(
                    "device {s:?} is not one of auto, cpu, cuda:N"
                )));
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Config(format!(
                    "device {s} asked for, but this binary was built without the `cuda` feature \
                     (rebuild with `cargo build --release --features cuda`) or no GPU is visible"
                )));
            }
            Ok(Device::new_cuda(n)?)
        }
    }
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

//! `--device auto|cpu|cuda[:N]`.

use crate::error::{Error, Result};
use tch::Device;

/// Parses a device name; `auto` is the first CUDA device when there is one, else the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    let cuda = |i: usize| -> Result<Device> {
        if !tch::Cuda::is_available() {
            return Err(Error::Input(format!("--device {s}: CUDA is not available here (use --device cpu)")));
        }
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            return Err(Error::Input(format!("--device {s}: there are {n} CUDA device(s)")));
        }
        Ok(Device::Cuda(i))
    };
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(Error::Input(format!("--device {s}: expected auto, cpu, cuda or cuda:N"))),
        },
    }
}

/// A short name for messages.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

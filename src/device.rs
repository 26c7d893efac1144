//! `run.device`: "auto" picks CUDA, then Metal, then the CPU, among what this build supports.

use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

/// Parses the spec's device string; the error says what would be right.
pub fn parse(s: &str) -> Result<DeviceChoice, String> {
    let want = "\"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"";
    match s {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        "metal" => Ok(DeviceChoice::Metal),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
            _ => Err(format!("expected {want}")),
        },
    }
}

/// Fails when this build cannot use the chosen device (without touching the device).
pub fn check_built(choice: DeviceChoice) -> anyhow::Result<()> {
    let feature = match choice {
        DeviceChoice::Cuda(_) if !candle_core::utils::cuda_is_available() => "cuda",
        DeviceChoice::Metal if !candle_core::utils::metal_is_available() => "metal",
        _ => return Ok(()),
    };
    anyhow::bail!(
        "this ternlab was built without {feature}: build with \
         `cargo build --release --features {feature}`"
    )
}

/// Opens the device (and names it for reports: "cpu", "cuda:0", "metal"), with a message
/// naming the cargo feature when the build lacks it.
pub fn open(choice: DeviceChoice) -> anyhow::Result<(Device, String)> {
    let device = open_device(choice)?;
    let name = match (&device, choice) {
        (Device::Cuda(_), DeviceChoice::Cuda(n)) => format!("cuda:{n}"),
        (Device::Cuda(_), _) => "cuda:0".into(),
        (Device::Metal(_), _) => "metal".into(),
        (Device::Cpu, _) => "cpu".into(),
    };
    Ok((device, name))
}

fn open_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => {
            check_built(choice)?;
            Ok(Device::new_cuda(n)?)
        }
        DeviceChoice::Metal => {
            check_built(choice)?;
            Ok(Device::new_metal(0)?)
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

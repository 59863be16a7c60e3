//! What one NVML pass yields, independent of NVML itself, so that everything
//! downstream (attribution, lost-GPU bookkeeping, exposition) is tested with
//! plain values through the [`GpuSource`] trait.

pub mod nvml;

use crate::health::ErrorKind;

/// A source of GPU readings: NVML in production, a scripted fake in tests.
/// `collect` never fails as a whole; what went wrong is inside the reading.
///
/// ```
/// use tokentap_gpu_exporter::gpu::{DeviceIdentity, DeviceReading, GpuReading, GpuSource, NvmlStatus};
/// use tokentap_gpu_exporter::health::ErrorKind;
///
/// /// One GPU at a fixed utilization, until the driver goes away.
/// struct OneGpu { passes: u32 }
///
/// impl GpuSource for OneGpu {
///     fn collect(&mut self) -> GpuReading {
///         self.passes += 1;
///         if self.passes > 2 {
///             return GpuReading::down(ErrorKind::DriverNotLoaded, "driver unloaded");
///         }
///         let device = DeviceReading {
///             identity: DeviceIdentity { uuid: "GPU-0".into(), ..DeviceIdentity::default() },
///             utilization_gpu_percent: Some(42),
///             ..DeviceReading::default()
///         };
///         GpuReading {
///             nvml: NvmlStatus::Up { driver_version: None, cuda_driver_version: None },
///             devices: vec![device],
///             ..GpuReading::down(ErrorKind::Unknown, "")
///         }
///     }
/// }
///
/// let mut source = OneGpu { passes: 0 };
/// assert_eq!(source.collect().devices[0].utilization_gpu_percent, Some(42));
/// source.collect();
/// assert!(matches!(source.collect().nvml, NvmlStatus::Down { kind: ErrorKind::DriverNotLoaded, .. }));
/// ```
pub trait GpuSource: Send {
    fn collect(&mut self) -> GpuReading;
}

/// State of the NVML library itself.
#[derive(Clone, Debug, PartialEq)]
pub enum NvmlStatus {
    Up {
        driver_version: Option<String>,
        cuda_driver_version: Option<i32>,
    },
    /// No usable NVML: the library is missing or init failed. The message is
    /// logged; the kind is exported.
    Down { kind: ErrorKind, message: String },
}

/// One pass over every GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuReading {
    pub nvml: NvmlStatus,
    pub devices: Vec<DeviceReading>,
    /// XID events observed since the previous pass.
    pub xid_events: Vec<XidEvent>,
    /// Whether the XID event thread is running with at least one GPU
    /// registered; `None` while NVML is down.
    pub xid_watch_healthy: Option<bool>,
    /// Failed calls, one entry per failure.
    pub errors: Vec<CallError>,
    /// The device list was rebuilt in this pass (first pass, count change,
    /// or after a GPU was lost).
    pub enumerated: bool,
}

impl GpuReading {
    pub fn down(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            nvml: NvmlStatus::Down {
                kind,
                message: message.into(),
            },
            devices: Vec::new(),
            xid_events: Vec::new(),
            xid_watch_healthy: None,
            errors: Vec::new(),
            enumerated: false,
        }
    }
}

/// A failed NVML call: which reading, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    pub call: &'static str,
    pub kind: ErrorKind,
    /// True for errors of the XID event thread rather than the poller.
    pub from_events: bool,
}

/// Static identity of a GPU, fetched once per enumeration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub index: u32,
    /// `GPU-…`, as the device plugin hands it out.
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: Option<String>,
    pub serial: Option<String>,
    pub minor_number: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReading {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub reserved_bytes: u64,
}

/// Readings of one GPU. `None` means NVML did not give the value (not
/// supported on this device, or the call failed; failures are in
/// [`GpuReading::errors`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceReading {
    pub identity: DeviceIdentity,
    /// The GPU answered GPU_IS_LOST: it fell off the bus.
    pub lost: bool,
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub memory: Option<MemoryReading>,
    pub temperature_celsius: Option<u32>,
    pub power_usage_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    pub energy_millijoules: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// NVML clocks-event (throttle) reason bitmask.
    pub throttle_reasons: Option<u64>,
    /// Volatile (since driver load) ECC error counts.
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    pub pcie_replays: Option<u32>,
    pub mig_enabled: Option<bool>,
    pub mig: Vec<MigReading>,
    pub processes: Vec<ProcessReading>,
}

impl DeviceReading {
    /// A GPU known from an earlier enumeration that no longer answers.
    pub fn lost(identity: DeviceIdentity) -> Self {
        Self {
            identity,
            lost: true,
            ..Self::default()
        }
    }
}

/// One MIG instance of a GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigReading {
    /// `MIG-…`, as the device plugin hands it out.
    pub uuid: String,
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
    /// Profile such as `1g.5gb`, from the MIG device name.
    pub profile: String,
    pub memory: Option<MemoryReading>,
}

/// A compute process on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessReading {
    /// Host PID, as NVML reports it.
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
    pub gpu_instance_id: Option<u32>,
}

/// An XID error reported by the driver for a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidEvent {
    pub gpu_uuid: String,
    /// `None` when the driver reported the XID as unknown (999).
    pub xid: Option<u64>,
}

/// The profile part of a MIG device name: `NVIDIA A100-SXM4-40GB MIG 1g.5gb`
/// gives `1g.5gb`. Unknown shapes give an empty string.
pub fn mig_profile_from_name(name: &str) -> String {
    name.rsplit_once("MIG ")
        .map(|(_, profile)| profile.trim())
        .filter(|p| {
            !p.is_empty()
                && p.len() <= 32
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '+')
        })
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_profiles_come_from_device_names() {
        assert_eq!(
            mig_profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb"),
            "1g.5gb"
        );
        assert_eq!(
            mig_profile_from_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me"),
            "1g.10gb+me"
        );
        assert_eq!(mig_profile_from_name("NVIDIA H100 80GB HBM3"), "");
        assert_eq!(mig_profile_from_name("X MIG {bad}"), "");
    }
}

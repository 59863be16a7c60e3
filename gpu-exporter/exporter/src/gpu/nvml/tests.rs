use super::*;

#[test]
fn not_supported_is_not_an_error() {
    assert_eq!(error_kind(&NvmlError::NotSupported), None);
    assert_eq!(error_kind(&NvmlError::GpuLost), Some(ErrorKind::GpuLost));
    assert_eq!(
        error_kind(&NvmlError::FailedToLoadSymbol("x".into())),
        Some(ErrorKind::SymbolMissing)
    );
}

#[test]
fn missing_library_is_reported_not_panicked() {
    let mut source = NvmlSource::new(NvmlConfig {
        lib_path: Some("/nonexistent/libnvidia-ml.so.1".into()),
        retry_interval: Duration::from_secs(3600),
        xid_events: true,
    });
    let reading = source.collect();
    assert_eq!(reading.errors.len(), 1, "the load attempt is one error");
    // Before the retry interval no new attempt, so no new error.
    assert!(source.collect().errors.is_empty());
    match reading.nvml {
        NvmlStatus::Down { kind, message } => {
            assert_eq!(kind, ErrorKind::LibraryNotFound);
            assert!(
                message.contains("/nonexistent/libnvidia-ml.so.1"),
                "{message}"
            );
        }
        other => panic!("expected NVML down, got {other:?}"),
    }
    assert!(reading.devices.is_empty());
}

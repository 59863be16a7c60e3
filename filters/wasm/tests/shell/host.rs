//! The test host's own guarantees, shown on the real module.

use tokentap_testhost::{Error, Headers, HostCall, Stream};

use crate::common::{plugin, Gateway};

#[test]
fn a_trap_is_an_error_that_carries_the_captured_log() {
    let mut gw = Gateway::shipped();
    // A context Envoy never announced: the SDK panics, the module aborts.
    gw.host.state_mut().streams.insert(77, Stream::default());
    let err = gw
        .host
        .request_headers(77, Headers::new([(":path", "/v1/chat/completions")]), true);
    let Err(Error::Trap { function, log, .. }) = err else {
        panic!("expected a trap, got {err:?}");
    };
    assert_eq!(function, "proxy_on_request_headers");
    assert!(
        log.contains("panic") && log.contains("configured ("),
        "{log}"
    );
}

#[test]
fn every_import_of_the_module_is_implemented() {
    let gw = Gateway::shipped();
    let unimplemented: Vec<_> = gw
        .host
        .calls()
        .iter()
        .filter(|r| matches!(r.call, HostCall::Unimplemented { .. }))
        .collect();
    assert!(unimplemented.is_empty());
    // proxy-wasm gRPC and status calls are stubs that refuse; everything
    // else the module imports is implemented.
    let stubbed: Vec<(String, String)> = plugin()
        .imports()
        .into_iter()
        .filter(|(_, name)| {
            !tokentap_testhost::implemented()
                .iter()
                .any(|(_, n)| n == name)
        })
        .collect();
    let allowed = [
        "proxy_grpc_call",
        "proxy_grpc_stream",
        "proxy_grpc_send",
        "proxy_grpc_cancel",
        "proxy_grpc_close",
        "proxy_get_status",
    ];
    for (module, name) in &stubbed {
        assert!(
            allowed.contains(&name.as_str()),
            "{module}.{name} has no implementation"
        );
    }
}

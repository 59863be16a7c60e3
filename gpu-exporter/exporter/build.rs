//! Compiles the kubelet PodResources proto (client side) with a vendored
//! protoc, so building needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded, so setting the environment is fine.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&["proto/podresources.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/podresources.proto");
    Ok(())
}

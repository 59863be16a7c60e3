//! Compiles the exporter's PodResources proto (server side), so the fake
//! kubelet and the exporter's client share one definition.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded, so setting the environment is fine.
    std::env::set_var("PROTOC", protoc);
    let proto_dir = "../../gpu-exporter/exporter/proto";
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .compile_protos(
            &[format!("{proto_dir}/podresources.proto")],
            &[proto_dir.to_string()],
        )?;
    println!("cargo:rerun-if-changed={proto_dir}/podresources.proto");
    Ok(())
}

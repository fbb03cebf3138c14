//! Compiles `proto/*.proto` into Rust with protox (a pure-Rust protobuf
//! compiler, so no system `protoc`) and tonic-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/engine.proto",
        "proto/manager.proto",
        "proto/agent.proto",
        "proto/csi.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        // The engine-ctl CLI prints engine replies as JSON.
        .type_attribute(".shorthorn.engine.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}

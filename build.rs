//! Compiles `proto/*.proto` into Rust with protox (a pure-Rust protobuf
//! compiler, so no system `protoc`) and tonic-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/engine.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("vidpulse/v1/event.proto"),
        root.join("vidpulse/v1/watermark.proto"),
    ];
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .type_attribute(
            ".vidpulse.v1.Event.payload",
            "#[serde(rename_all = \"snake_case\")]",
        )
        .compile_fds(fds)?;
    Ok(())
}

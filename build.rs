//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with protox (a pure-Rust
//! protobuf compiler), so no `protoc` is needed.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["proto"]).expect("proto/onnx.proto should compile");
    prost_build::Config::new().compile_fds(fds).expect("prost code generation for onnx.proto");
}

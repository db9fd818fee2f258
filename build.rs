//! Generates protobuf types with protox (a pure-Rust protobuf compiler), so no `protoc` is needed:
//! the ONNX types from the vendored `proto/onnx.proto`, and the Milvus API's messages from the
//! vendored `proto/milvus/*.proto` (the gRPC calls themselves are made by `index::milvus::client`).

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=proto/milvus");
    let fds = protox::compile(["onnx.proto"], ["proto"]).expect("proto/onnx.proto should compile");
    prost_build::Config::new().compile_fds(fds).expect("prost code generation for onnx.proto");
    let fds = protox::compile(["milvus.proto"], ["proto/milvus"]).expect("proto/milvus should compile");
    prost_build::Config::new().compile_fds(fds).expect("prost code generation for the Milvus API");
}

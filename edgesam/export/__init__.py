"""From a trained student to a deployable bundle: the ONNX graphs (`export.onnx`,
`export.modules`, the prompt decoder `export.decoder`), graph checks, onnxruntime
quantization, the ONNX evaluation backend, the bundle (`export.bundle.build_bundle`) and its
model card. The bundle is read back by the torch-free `edgesam.client`."""

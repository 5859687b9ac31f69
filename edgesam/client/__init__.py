"""The torch-free client: what runs an exported bundle with numpy, onnxruntime and Pillow only.

`OnnxPredictor` (`client.predictor`) reads a bundle (`client.bundle`), checks its inputs
(`client.inputs`), and applies SAM's image and mask transforms (`client.transforms`) and the
granularity prior's proposal rule (`client.prior`) in numpy. Nothing here imports torch or
pydantic (a test asserts it), so the package ships to machines without them.
"""

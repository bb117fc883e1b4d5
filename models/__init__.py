"""Reference networks, exporters and committed example models for tnonnx tests and demos."""

"""Weight files: checkpoints (load, save, built-ins), conversion of foreign weights, export, and the
ONNX Runtime / OpenVINO runtimes of an exported file. The built-in checkpoints ship in this folder."""

"""The native fused dequantize-add-requantize op: its Python face, the format rules per mode, the numpy reference."""

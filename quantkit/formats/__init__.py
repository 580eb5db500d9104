"""Export formats: per format one module with its packing, reading, quantization_config and constraints."""

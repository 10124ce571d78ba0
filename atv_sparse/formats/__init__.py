"""The compressed checkpoint format: bitmask packing (``bitmask``), the ``quantization_config``
(``spec``), safetensors headers (``safetensors_io``) and the directory writer (``checkpoint``)."""

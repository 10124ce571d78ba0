"""The compressed checkpoint format: the safetensors dtype names (``dtypes``), bitmask packing
(``bitmask``), the ``quantization_config`` (``spec``), safetensors headers (``safetensors_io``), the
directory writer (``checkpoint``, ``shard_io``) and the shard checksums it records (``verify``)."""

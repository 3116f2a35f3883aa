"""Compression of tensors on the wire: codec chains as configured (``spec``), dense
bytes (``dense``), quantizers (``quantize``), tensor encode/decode (``tensor``), and
update deltas (``delta``). This package init stays free of torch so that config
validation is cheap."""

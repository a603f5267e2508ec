"""arcopo_fast: AR-CoPO for streaming autoregressive video generators, built for throughput."""

__version__ = "0.1.0"

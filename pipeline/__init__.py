"""Show, Attend and Tell as a two-stage pipeline: frozen backbone -> HDF5 cache -> attention LSTM decoder."""
__version__ = "0.1.0"

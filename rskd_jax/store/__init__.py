"""Token and teacher stores (TensorStore zarr3): the only place that knows their layouts."""

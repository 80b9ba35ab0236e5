"""The engine: a run's plan and execution (`pipeline`), its executors and Ray actors (`runtime`,
`readers`), the choice of the grid the model sees (`fidelity`), stitching into the mosaic and the
streamed COG (`stitch`, its parts in `mosaic`, and `cog`), and the output's STAC item (`stac`)."""

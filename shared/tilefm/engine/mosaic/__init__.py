"""The stitcher's parts, which `tilefm.engine.stitch.MosaicWriter` puts together: halo blending of
full-resolution outputs (`blend`), per-patch outputs assembled into their parent tiles
(`patches`), the overview levels made while stitching (`pyramid`), and where finished blocks go
(`sinks`: the streamed COG, or a scratch mosaic GDAL's COG driver copies), with the buffers,
blocks and geometry they share (`blocks`) and the mosaic's threads (`threads`)."""

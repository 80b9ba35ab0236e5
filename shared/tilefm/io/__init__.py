"""Inputs: scenes and their bands (`scene`, `bands`), tile reads on the web-mercator grid
(`read`, `warp`) and on the scene's own grid (`native`)."""

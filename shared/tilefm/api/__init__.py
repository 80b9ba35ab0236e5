"""HTTP front ends as FastAPI factories (TiTiler-style): routers built over library objects that
are injected, so services/ only wire them to settings."""
